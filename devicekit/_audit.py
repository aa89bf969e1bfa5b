"""`audit(obj)`: device bugs found by looking at a model, before anything runs.

The audit walks the object once (modules through their registered parameters, buffers and
submodules, everything else through the table of container kinds that every devicekit walker
reads) and runs nothing: no forward, no hooks, no `.to()`. What it finds are the states that make
`Module.to()` leave something behind, or that make a model fail once it is on its devices:

| kind | severity | what |
|---|---|---|
| `plain-attribute-tensor` | error | a tensor in a module's `__dict__`, or in a list/dict there |
| `unregistered-module` | error | a module held in a plain list or dict: not registered |
| `stale-alias` | error | a reference to a buffer (or a parameter on meta), or a view of one |
| `split-tie` | error | tied parameters that are two tensors (shared storage, HF ties) |
| `uninitialised-after-to-empty` | error | a non-persistent buffer on meta |
| `optimizer-state-device` | error | optimizer state on another device than its parameter |
| `mixed-devices` | warning | parameters and buffers on more than one device |
| `non-persistent-buffer` | info | a buffer `state_dict()` does not save (with `info=True`) |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import torch

from devicekit._containers import ATOM, MODULE, OPAQUE, TENSOR, attribute_step
from devicekit._describe import describe_tensor
from devicekit._errors import InvalidArgumentError
from devicekit._paths import Where, _kind, _labelled, listing, render
from devicekit._provenance import module_internals

__all__ = ["AuditFinding", "AuditReport", "Severity", "audit", "severity_rank"]

#: How bad a finding is: `"error"` (a bug: something will not move, or will fail),
#: `"warning"` (usually a bug, sometimes meant: a model split across devices on purpose) or
#: `"info"` (worth knowing, not a bug by itself).
Severity = Literal["error", "warning", "info"]
_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


@dataclasses.dataclass(frozen=True)
class AuditFinding:
    """One thing `audit` found.

    Attributes:
        path: Where it is, starting with the audited object's name: `"model.blocks[3].attn.mask"`.
        kind: A short stable identifier of the pattern (`"plain-attribute-tensor"`,
            `"mixed-devices"`, ...; the table is in the docs).
        message: What was found and why it is a problem, naming the path.
        fix: What to change.
        severity: `"error"`, `"warning"` or `"info"`.
    """

    path: str
    kind: str
    message: str
    fix: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.message}\n    fix: {self.fix}"


class AuditReport(Sequence[AuditFinding]):
    """What `audit` found: an immutable sequence of `AuditFinding`, errors first.

    It is falsy when nothing was found, compares equal to a sequence of the same findings, and
    prints as a readable report (`str(report)`, or `report.format(min_severity)`).

    Example:
        >>> import torch, devicekit
        >>> report = devicekit.audit(torch.nn.Linear(2, 2))
        >>> bool(report), len(report), str(report)
        (False, 0, 'audit(model): no findings.')
    """

    __slots__ = ("_findings", "_name")

    def __init__(self, findings: Iterable[AuditFinding] = (), *, name: str = "model") -> None:
        self._findings = tuple(findings)
        self._name = name

    @property
    def name(self) -> str:
        """The name the audited object has in the paths (`"model"`)."""
        return self._name

    def __len__(self) -> int:
        return len(self._findings)

    @overload
    def __getitem__(self, index: int) -> AuditFinding: ...

    @overload
    def __getitem__(self, index: slice) -> AuditReport: ...

    def __getitem__(self, index: int | slice) -> AuditFinding | AuditReport:
        if isinstance(index, slice):
            return AuditReport(self._findings[index], name=self.name)
        return self._findings[index]

    def __iter__(self) -> Iterator[AuditFinding]:
        return iter(self._findings)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._findings)

    def __repr__(self) -> str:
        return f"AuditReport({list(self._findings)!r}, name={self.name!r})"

    def __str__(self) -> str:
        return self.format()

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds found, each once, in report order."""
        return tuple(dict.fromkeys(finding.kind for finding in self._findings))

    def at_least(self, severity: Severity) -> AuditReport:
        """The findings of `severity` or worse (`"warning"`: warnings and errors).

        Raises:
            InvalidArgumentError: `severity` is not `"error"`, `"warning"` or `"info"`.
        """
        rank = severity_rank(severity, f"AuditReport.at_least({severity!r})")
        return AuditReport(
            (finding for finding in self._findings if _RANK[finding.severity] >= rank),
            name=self.name,
        )

    def format(self, min_severity: Severity = "info") -> str:
        """The report as text: a summary line, then each finding with its fix.

        Raises:
            InvalidArgumentError: `min_severity` is not `"error"`, `"warning"` or `"info"`.
        """
        severity_rank(min_severity, f"AuditReport.format({min_severity!r})")
        return self._format(f"audit({self.name})", min_severity)

    def _format(self, title: str, min_severity: Severity = "info") -> str:
        """`format(min_severity)` under another title (`assert_movable(model)`)."""
        shown = self.at_least(min_severity)
        if not shown:
            return f"{title}: no findings."
        counts = {severity: 0 for severity in ("error", "warning", "info")}
        for finding in shown:
            counts[finding.severity] += 1
        summary = ", ".join(
            f"{count} {severity}{'' if count == 1 else 's'}"
            for severity, count in counts.items()
            if count
        )
        lines = [f"{title}: {summary}"]
        lines.extend(str(finding) for finding in shown)
        return "\n".join(lines)


def severity_rank(severity: object, where: str) -> int:
    """The rank of a severity (`info` 0, `warning` 1, `error` 2), checked.

    Raises:
        InvalidArgumentError: `severity` is none of them; the message starts with `where`.
    """
    rank = _RANK.get(severity) if isinstance(severity, str) else None
    if rank is None:
        raise InvalidArgumentError(
            f"{where}: expected a severity, one of 'error', 'warning' or 'info', got {severity!r}."
        )
    return rank


def _module_step(key: Any) -> str:
    """A submodule's, parameter's or buffer's name in a path: `[3]` for a place in a
    `ModuleList` or `ParameterList`, `.attn` otherwise."""
    return f"[{key}]" if isinstance(key, str) and key.isdigit() else f".{key}"


@dataclasses.dataclass
class _Registered:
    """A parameter or buffer, where it was first met."""

    tensor: torch.Tensor
    where: Where
    parameter: bool
    persistent: bool


@dataclasses.dataclass
class _Holder:
    """The plain attribute of a module that a value was found in."""

    module: torch.nn.Module
    attribute: str
    where: Where
    value: Any


class _Walk:
    """One pass over the audited object, recording what the checks read."""

    def __init__(self, root: Any) -> None:
        self.registered: dict[int, _Registered] = {}
        self.modules: dict[int, tuple[torch.nn.Module, Where]] = {}
        self.data: list[tuple[torch.Tensor, Where]] = []  # tensors outside any module
        self.held: list[tuple[Any, Where, _Holder]] = []  # tensors and modules in plain attributes
        self.optimizers: list[tuple[torch.optim.Optimizer, Where]] = []
        self._seen: dict[int, Any] = {}
        self._storages: dict[tuple[torch.device, int], list[_Registered]] | None = None
        self._run(root)

    def storages(self) -> dict[tuple[torch.device, int], list[_Registered]]:
        """The registered tensors by the memory they use (built on first use)."""
        if self._storages is None:
            self._storages = {}
            for registered in self.registered.values():
                key = _storage_key(registered.tensor)
                if key is not None:
                    self._storages.setdefault(key, []).append(registered)
        return self._storages

    def _run(self, root: Any) -> None:
        stack: list[tuple[Any, Where, _Holder | None]] = [(root, None, None)]
        while stack:
            value, where, holder = stack.pop()
            kind = _kind(type(value))
            if kind == TENSOR:
                if holder is None:
                    self.data.append((value, where))
                else:
                    self.held.append((value, where, holder))
                continue
            if kind == MODULE:
                if holder is None:
                    self._module(value, where, stack)
                else:  # judged once the walk knows every registered module
                    self.held.append((value, where, holder))
                continue
            if isinstance(value, torch.optim.Optimizer):
                if id(value) not in self._seen:
                    self._seen[id(value)] = value
                    self.optimizers.append((value, where))
                continue
            if kind in (ATOM, OPAQUE) or id(value) in self._seen:
                continue
            self._seen[id(value)] = value
            step, pairs = _labelled(value, kind, look_inside=False)
            stack.extend(
                (child, (where, step, key), holder) for key, child in reversed(list(pairs))
            )

    def _module(
        self,
        module: torch.nn.Module,
        where: Where,
        stack: list[tuple[Any, Where, _Holder | None]],
    ) -> None:
        if id(module) in self.modules:
            return
        self.modules[id(module)] = (module, where)
        registered = self.registered
        # A module whose __init__ never called nn.Module's has none of these.
        for name, parameter in getattr(module, "_parameters", {}).items():
            if parameter is not None and id(parameter) not in registered:
                registered[id(parameter)] = _Registered(
                    parameter,
                    (where, _module_step, name),
                    parameter=True,
                    persistent=True,
                )
        non_persistent = getattr(module, "_non_persistent_buffers_set", ())
        for name, buffer in getattr(module, "_buffers", {}).items():
            if buffer is not None and id(buffer) not in registered:
                registered[id(buffer)] = _Registered(
                    buffer,
                    (where, _module_step, name),
                    parameter=False,
                    persistent=name not in non_persistent,
                )
        internals = module_internals()
        attributes = [(k, v) for k, v in vars(module).items() if k not in internals]
        for name, value in reversed(attributes):
            at: Where = (where, attribute_step, name)
            stack.append((value, at, _Holder(module, name, at, value)))
        children = [(k, v) for k, v in getattr(module, "_modules", {}).items() if v is not None]
        for name, child in reversed(children):
            stack.append((child, (where, _module_step, name), None))


def audit(obj: Any, *, name: str = "model", info: bool = False) -> AuditReport:
    """Find device bugs in a model (or any nested structure) without running anything.

    Looks for what `Module.to()` leaves behind and what fails once the model is on its devices:
    tensors held as plain attributes of a module or in lists, dicts and tuples there, modules
    held in plain lists, plain references to a registered buffer, tied parameters that are two
    tensors (shared storage, or Hugging Face ties that are two tensors), non-persistent
    buffers on the meta device that `to_empty()` would leave uninitialised, optimizer state on
    another device than its parameter (errors); parameters, buffers and other tensors on more
    than one device (a warning: a model split across devices on purpose is fine). A plain
    reference to a parameter (RNNs' `_flat_weights`) is not a finding: `.to()` keeps parameters'
    identity, except from or to the meta device.

    Args:
        obj: A module, optimizer, tensor, or any nesting of them in lists, dicts, tuples,
            dataclasses and the other containers `to_device` knows.
        name: What to call `obj` in the paths (`"model"` gives `model.blocks[3].attn.mask`).
        info: Also report findings that are not bugs by themselves: every non-persistent
            buffer (not saved by `state_dict()`).

    Returns:
        The findings, errors first; falsy when there are none.

    Raises:
        InvalidArgumentError: `name` is not a non-empty string, or `info` is not a bool.

    Example:
        >>> import torch, devicekit
        >>> class Attention(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.proj = torch.nn.Linear(4, 4)
        ...         self.mask = torch.ones(4, 4).tril()
        >>> report = devicekit.audit(Attention())
        >>> [(finding.path, finding.kind) for finding in report]
        [('model.mask', 'plain-attribute-tensor')]
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(
            f"audit(name={name!r}): expected a non-empty string naming the object in the "
            "paths, such as 'model'."
        )
    if not isinstance(info, bool):
        raise InvalidArgumentError(f"audit(info={info!r}): expected True or False.")
    walk = _Walk(obj)
    findings = [
        *_held(walk, name),
        *_split_ties(walk, name),
        *_buffers(walk, name, info=info),
        *_optimizer_states(walk, name),
        *_mixed_devices(walk, name, obj),
    ]
    findings.sort(key=lambda finding: -_RANK[finding.severity])
    return AuditReport(findings, name=name)


def _owner(holder: _Holder) -> str:
    return type(holder.module).__qualname__


def _recomputed(holder: _Holder) -> bool:
    """Whether a forward pre-hook sets the attribute before each call (old-style `weight_norm`,
    `spectral_norm`, `prune`), from parameters and buffers that `.to()` moves."""
    for hook in getattr(holder.module, "_forward_pre_hooks", {}).values():
        for field in ("name", "_tensor_name"):
            if getattr(hook, field, None) == holder.attribute:
                return True
    return False


def _moves_itself(holder: _Holder) -> bool:
    """Whether the module overrides `_apply`, which `.to()`, `.cuda()` and `to_empty()` call:
    then it is trusted to move or refresh its own attributes (RNNs rebuild `_flat_weights`
    there)."""
    return type(holder.module)._apply is not torch.nn.Module._apply


def _container_fix(holder: _Holder, what: str) -> str:
    """The `nn` container that registers a plain list or dict of `what`."""
    mapping = isinstance(holder.value, Mapping)
    if what == "module":
        kind = "nn.ModuleDict" if mapping else "nn.ModuleList"
        return f"Hold the modules in an {kind}: self.{holder.attribute} = {kind}(...)"
    kind = "nn.ParameterDict" if mapping else "nn.ParameterList"
    return f"Hold the parameters in an {kind}: self.{holder.attribute} = {kind}(...)"


def _held(walk: _Walk, name: str) -> Iterator[AuditFinding]:
    for value, where, holder in walk.held:
        if _moves_itself(holder) or (where is holder.where and _recomputed(holder)):
            continue
        path = render(name, where)
        if where is holder.where:
            place = f"held as a plain attribute of {_owner(holder)}"
        else:
            place = (
                f"inside the {type(holder.value).__name__} {render(name, holder.where)}, "
                f"a plain attribute of {_owner(holder)}"
            )
        if isinstance(value, torch.nn.Module):
            if not _moves_with(value, walk):
                yield _unregistered_module(value, path, place, holder, name)
            continue
        registered = walk.registered.get(id(value))
        if registered is not None:
            if not registered.parameter or value.device.type == "meta":
                yield _stale_alias(value, path, place, registered, holder, name)
            # else: `.to()` keeps a parameter's identity, so the reference moves with it
            continue
        key = _storage_key(value)
        sharing = None if key is None else walk.storages().get(key)
        if sharing:  # a view of a registered tensor
            yield _stale_view(value, path, place, sharing[0], holder, name)
        else:
            yield _plain_tensor(value, path, place, holder)


def _moves_with(module: torch.nn.Module, walk: _Walk) -> bool:
    """Whether a module held in a plain attribute moves anyway: it is registered elsewhere, or
    all its parameters and buffers are (a traced module's `_actual_script_module`)."""
    if id(module) in walk.modules:
        return True
    try:
        tensors = [*module.parameters(), *module.buffers()]
    except Exception:  # a module whose __init__ never called nn.Module's
        return False
    return all(id(tensor) in walk.registered for tensor in tensors)


def _unregistered_module(
    module: torch.nn.Module, path: str, place: str, holder: _Holder, name: str
) -> AuditFinding:
    if holder.value is module:
        fix = (
            f"Assign it as usual (self.{holder.attribute} = module) so that nn.Module registers it"
        )
    else:
        fix = _container_fix(holder, "module")
    return AuditFinding(
        path,
        "unregistered-module",
        f"{path} is a {type(module).__qualname__} {place}, not a registered submodule: "
        f"Module.to() does not move its parameters, and {name}.parameters() does not list "
        "them.",
        f"{fix}.",
    )


def _from_module(where: Where, holder: _Holder, name: str) -> str:
    """`where` as the holding module's code reads it (`self.lin.weight`), when it is inside
    that module; else its whole path."""
    module_where = holder.where[0] if holder.where is not None else None
    parts, at = [], where
    while at is not None and at is not module_where:
        at, step, key = at
        parts.append(step(key))
    if at is module_where:
        return "self" + "".join(reversed(parts))
    return render(name, where)


def _stale_alias(
    tensor: torch.Tensor, path: str, place: str, registered: _Registered, holder: _Holder, name: str
) -> AuditFinding:
    original = render(name, registered.where)
    if registered.parameter:
        what = f"the parameter {original} on the meta device"
        why = "to_empty() replaces parameters on meta with new tensors"
    else:
        what = f"the buffer {original}"
        why = "Module.to() replaces buffers with moved copies"
    return AuditFinding(
        path,
        "stale-alias",
        f"{path} ({describe_tensor(tensor)}) is {what}, {place}: {why}, so this reference "
        "keeps the old tensor on the old device.",
        f"Read {_from_module(registered.where, holder, name)} where it is needed instead of "
        "keeping a second reference to it.",
    )


def _stale_view(
    tensor: torch.Tensor, path: str, place: str, registered: _Registered, holder: _Holder, name: str
) -> AuditFinding:
    original = render(name, registered.where)
    what = "parameter" if registered.parameter else "buffer"
    return AuditFinding(
        path,
        "stale-alias",
        f"{path} ({describe_tensor(tensor)}) shares memory with the {what} {original}, "
        f"{place}: Module.to() gives the {what} new memory, and this view keeps the old "
        "memory on the old device.",
        f"Compute it from {_from_module(registered.where, holder, name)} where it is needed "
        "(in forward) instead of keeping a view of it.",
    )


def _plain_tensor(tensor: torch.Tensor, path: str, place: str, holder: _Holder) -> AuditFinding:
    parameter = isinstance(tensor, torch.nn.Parameter)
    owner, attribute = _owner(holder), holder.attribute
    if holder.value is tensor and parameter:
        fix = f'Register it in {owner}.__init__: self.register_parameter("{attribute}", ...)'
    elif holder.value is tensor:
        fix = (
            f'Register it in {owner}.__init__: self.register_buffer("{attribute}", ..., '
            "persistent=False) (persistent=True also saves it in the state_dict)"
        )
    elif parameter:
        fix = _container_fix(holder, "parameter")
    else:
        fix = (
            "Register each tensor as a buffer (self.register_buffer(name, tensor, "
            "persistent=False)), or stack them into one buffer"
        )
    what = "parameter" if parameter else "tensor"
    registered_as = "parameter" if parameter else "buffer"
    return AuditFinding(
        path,
        "plain-attribute-tensor",
        f"{path} is a {what} ({describe_tensor(tensor)}) {place}, not a registered "
        f"{registered_as}: Module.to() does not move it.",
        f"{fix}.",
    )


def _storage_key(tensor: torch.Tensor) -> tuple[torch.device, int] | None:
    """Which memory a tensor's storage is, or `None` where that means nothing (meta, empty)."""
    try:
        if tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return None
        return tensor.device, storage.data_ptr()
    except Exception:  # lazy (uninitialised) parameters, subclasses without storage
        return None


def _split_ties(walk: _Walk, name: str) -> Iterator[AuditFinding]:
    for group in walk.storages().values():
        if len(group) < 2 or not any(registered.parameter for registered in group):
            continue  # buffers that are views of one cache are read, never trained
        first, *others = group
        for other in others:
            path, tied_to = render(name, other.where), render(name, first.where)
            yield AuditFinding(
                path,
                "split-tie",
                f"{path} and {tied_to} are two tensors sharing one storage: Module.to() "
                "copies each separately, so after a move they no longer share memory and "
                "training updates them apart.",
                f"Tie them by assigning one parameter object to both ({path} = {tied_to}), "
                "not nn.Parameter(...) of the other or a view of it.",
            )
    reported: set[str] = set()  # a tie declared by a model and by its submodel is one tie
    for module, where in walk.modules.values():
        for target, source, declared_by in _declared_ties(module):
            tied, to = _tensor_at(module, target), _tensor_at(module, source)
            target_path = render(name, (where, _dotted_step, target))
            if tied is None or to is None or tied is to or target_path in reported:
                continue  # a name the audit cannot resolve is not its to judge
            reported.add(target_path)
            source_path = render(name, (where, _dotted_step, source))
            yield AuditFinding(
                target_path,
                "split-tie",
                f"{target_path} ({describe_tensor(tied)}) is declared tied to {source_path} "
                f"({describe_tensor(to)}) by {declared_by}, but they are two tensors: training "
                "updates them apart.",
                "Call model.tie_weights() after loading and placing the model, and keep tied "
                "weights on one device (in a device_map, the same device).",
            )


def _dotted_step(key: str) -> str:
    """A dotted parameter name (`lm_head.weight`) as a path: `.lm_head.weight`, `.h[0].w`."""
    return "".join(_module_step(part) for part in key.split("."))


def _declared_ties(module: torch.nn.Module) -> Iterator[tuple[str, str, str]]:
    """The ties a Hugging Face model declares, as `(target, source, declared by)` names of
    parameters: transformers 5's `all_tied_weights_keys`, or, for older models, the output
    embeddings tied to the input ones when `config.tie_word_embeddings` is set."""
    ties = vars(module).get("all_tied_weights_keys")
    if isinstance(ties, Mapping):
        for target, source in ties.items():
            if isinstance(target, str) and isinstance(source, str):
                yield target, source, "all_tied_weights_keys"
        return
    if not isinstance(getattr(type(module), "_tied_weights_keys", None), (list, tuple)):
        return
    if getattr(getattr(module, "config", None), "tie_word_embeddings", False) is not True:
        return
    try:
        output = module.get_output_embeddings().weight  # type: ignore[operator]
        source = module.get_input_embeddings().weight  # type: ignore[operator]
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    except Exception:  # no embeddings to tie (a base model), or not the methods we know
        return
    if id(output) in names and id(source) in names:
        yield names[id(output)], names[id(source)], "config.tie_word_embeddings"


def _tensor_at(module: torch.nn.Module, key: str) -> torch.Tensor | None:
    *parents, last = key.split(".")
    owner: Any = module
    for part in parents:
        owner = owner._modules.get(part) if isinstance(owner, torch.nn.Module) else None
        if owner is None:
            return None
    if not isinstance(owner, torch.nn.Module):
        return None
    found: torch.Tensor | None = owner._parameters.get(last)
    if found is None:
        found = owner._buffers.get(last)
    return found


def _buffers(walk: _Walk, name: str, *, info: bool) -> Iterator[AuditFinding]:
    for registered in walk.registered.values():
        if registered.parameter or registered.persistent:
            continue
        path = render(name, registered.where)
        if registered.tensor.device.type == "meta":
            yield AuditFinding(
                path,
                "uninitialised-after-to-empty",
                f"{path} is a non-persistent buffer on the meta device: to_empty() gives it "
                "uninitialised memory, and load_state_dict() does not fill it (the state_dict "
                "does not hold it).",
                "Recompute it after to_empty() (in the reset_parameters() or init_weights() you "
                "call then), build the model with buffers on a real device (accelerate's "
                "init_empty_weights(include_buffers=False)), or make it persistent.",
            )
        elif info:
            yield AuditFinding(
                path,
                "non-persistent-buffer",
                f"{path} is a non-persistent buffer: Module.to() moves it, but state_dict() "
                "does not save it, so a model built on the meta device and loaded with "
                "to_empty() and load_state_dict() would leave it uninitialised.",
                "Nothing to do while the model is built on a real device; otherwise recompute "
                "it after to_empty(), or make it persistent.",
                severity="info",
            )


def _optimizer_states(walk: _Walk, name: str) -> Iterator[AuditFinding]:
    for optimizer, where in walk.optimizers:
        base = render(name, where)
        for g, group in enumerate(optimizer.param_groups):
            for i, parameter in enumerate(group.get("params", ())):
                state = optimizer.state.get(parameter)
                if not isinstance(state, Mapping):
                    continue
                registered = walk.registered.get(id(parameter))
                label = (
                    render(name, registered.where)
                    if registered is not None
                    else f"{base}.param_groups[{g}]['params'][{i}]"
                )
                for key, value in state.items():
                    if not isinstance(value, torch.Tensor) or value.device == parameter.device:
                        continue
                    if value.dim() == 0 and value.device.type == "cpu":
                        continue  # a step count: torch keeps it on the CPU on purpose
                    path = f"{base}.state[{label}][{key!r}]"
                    yield AuditFinding(
                        path,
                        "optimizer-state-device",
                        f"{path} ({describe_tensor(value)}) is on another device than its "
                        f"parameter {label} ({parameter.device}): the next step() fails with a "
                        "device mismatch.",
                        "Move the state next to its parameters: "
                        "optimizer.load_state_dict(optimizer.state_dict()) after model.to(device) "
                        "(load_state_dict puts each state on its parameter's device), or create "
                        "the optimizer after moving the model.",
                    )


def _listing(name: str, wheres: list[Where], limit: int = 3) -> str:
    """The first `limit` paths, and how many more (only those shown are rendered)."""
    shown = listing([render(name, where) for where in wheres[:limit]], limit)
    more = len(wheres) - limit
    return shown if more <= 0 else f"{shown} and {more} more"


def _mixed_devices(walk: _Walk, name: str, obj: Any) -> Iterator[AuditFinding]:
    devices: dict[torch.device, list[Where]] = {}
    for registered in walk.registered.values():
        devices.setdefault(registered.tensor.device, []).append(registered.where)
    for tensor, where in walk.data:
        devices.setdefault(tensor.device, []).append(where)
    if len(devices) < 2:
        return
    what = (
        "parameters and buffers"
        if isinstance(obj, torch.nn.Module) and not walk.data
        else "tensors"
    )
    listed = "; ".join(f"{device}: {_listing(name, wheres)}" for device, wheres in devices.items())
    yield AuditFinding(
        name,
        "mixed-devices",
        f"the {what} of {name} are on {len(devices)} devices ({listed}).",
        f"Move it to one device ({name}.to(device), or devicekit.to_device for other "
        "objects). If it is split on purpose (model parallel, an accelerate device_map or "
        "offload), ignore this warning; the parts must then hand activations over in "
        "forward.",
        severity="warning",
    )
