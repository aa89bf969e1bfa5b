"""Turning a module built on `meta` into a real one: `materialize`.

The module's parameters, buffers and tensor attributes are collected as slots (which module,
which dict, which name); slots holding one tensor are tied and get one new tensor, and tensors
sharing a meta storage (views) get views of one real storage. Each storage is allocated once:
by replaying the ops `devicekit.deferred()` recorded (`init="replay"`), or empty
(`init="reset"` and `None`). Replay walks the recording backwards once to keep only the ops
that feed the module's storages, and every op that draws random numbers (so the generator
advances exactly as in eager construction); walking forwards it frees each temporary after
its last use, so memory never holds a parameter twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch.utils._pytree import tree_flatten, tree_map

from devicekit._deferred import Op, Recording, Ref, disown, recording_of, replaced, storage_key
from devicekit._describe import describe_tensor
from devicekit._errors import InvalidArgumentError, MaterializeError, MaterializeWarning
from devicekit._move import covers_storage, to_device
from devicekit._resolve import resolve
from devicekit._types import DeviceLike

__all__ = ["Init", "materialize"]

M = TypeVar("M", bound=torch.nn.Module)

Init = Literal["replay", "reset"] | None

_ROOT = "model"


class _Slot:
    """Where a module keeps one tensor: `entries[name]`, `entries` being `_parameters`,
    `_buffers` or the module's `__dict__`."""

    __slots__ = ("entries", "module", "name", "path")

    def __init__(self, module: torch.nn.Module, entries: dict[str, Any], name: str, path: str):
        self.module = module
        self.entries = entries
        self.name = name
        self.path = path


def _slots(module: torch.nn.Module) -> dict[int, tuple[torch.Tensor, list[_Slot]]]:
    """Every tensor of `module` (parameters, buffers, tensor attributes), by identity, with the
    slots that hold it, in the order `named_modules` meets them."""
    found: dict[int, tuple[torch.Tensor, list[_Slot]]] = {}
    for prefix, submodule in module.named_modules(remove_duplicate=True):
        base = f"{_ROOT}.{prefix}" if prefix else _ROOT
        attributes = vars(submodule)
        for entries in (submodule._parameters, submodule._buffers, attributes):
            for name, tensor in entries.items():
                if isinstance(tensor, torch.Tensor):
                    slot = _Slot(submodule, entries, name, f"{base}.{name}")
                    found.setdefault(id(tensor), (tensor, []))[1].append(slot)
    return found


def materialize(module: M, device: DeviceLike = None, *, init: Init = "replay") -> M:
    """Give a module built on `meta` real memory on `device`, with ties and values kept.

    Each meta storage is allocated once on `device`, and every alias is kept: a parameter tied
    between modules stays one `Parameter`, a buffer registered twice stays one tensor, and
    views of one tensor stay views of one storage. Tensors of the module that are not on `meta`
    are moved as `devicekit.to_device` moves them (ties kept), so a second call does nothing.

    Args:
        module: The module, changed in place.
        device: The target: anything `devicekit.as_device` accepts; `None` means
            `devicekit.current_device()`.
        init: `"replay"` (the default) replays the initialisation recorded when the module
            was built under `devicekit.deferred()`: parameters and buffers get exactly the
            values eager construction on `device` gives with the same seed, and the device's
            generator advances as it would have. `"reset"` leaves memory uninitialised and
            calls each module's `reset_parameters()` (or `_reset_parameters()`), children
            before parents, warning with `MaterializeWarning` about the modules that hold
            tensors and have neither. `None` leaves the memory uninitialised, like
            `Module.to_empty`.

    Returns:
        `module` itself.

    Raises:
        MaterializeError: With `init="replay"`, a meta tensor was not made inside a
            `deferred()` block (assigned, cast with `Module.to(dtype)` or copied with
            `copy.deepcopy` afterwards, which the message tells apart where it can, or built
            under another meta context), it was changed in place after the block, or a
            recorded op failed on `device`; the message names the tensor's path and the op.
        MoveError: Moving a tensor that is not on `meta` failed.
        InvalidArgumentError: `init` is not one of the values above, or `module` is not an
            `nn.Module`.
        InvalidDeviceSpecError: `device` is malformed.
        DeviceUnavailableError: `device` is not on this machine.

    Example:
        >>> import torch, devicekit
        >>> with devicekit.deferred():
        ...     model = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4))
        ...     model[1].weight = model[0].weight  # tied
        >>> model = devicekit.materialize(model, "cpu")
        >>> model[1].weight is model[0].weight, model[0].weight.device
        (True, device(type='cpu'))
    """
    if init not in ("replay", "reset", None):
        raise InvalidArgumentError(
            f"materialize(init={init!r}): expected 'replay', 'reset' or None, got {init!r}. "
            "Pass init='replay' (the recorded initialisation), 'reset' (reset_parameters()) "
            "or None (uninitialised memory)."
        )
    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(
            f"materialize({type(module).__name__}): expected an nn.Module, got a "
            f"{type(module).__name__}. Move other values with devicekit.to_device."
        )
    if device is None:
        from devicekit._context import current_device

        target = current_device()
    else:
        target = resolve(device, operation="materialize")
    if target.type != "meta":
        slots = _slots(module)
        metas = {key: entry for key, entry in slots.items() if entry[0].is_meta}
        if metas:
            if init == "replay":
                real = _replayed(metas, target)
            else:
                real = _allocated(metas, target)
            _repoint(metas, real)
            if init == "reset":
                _reset(module, metas, target)
        # Nothing of this subtree is left to replay: its recordings (and the tensors their ops
        # hold, such as a CPU tensor copied into a parameter) may go, unless other modules of
        # the same block still need them.
        disown(module.modules())
    # Tensors not on meta (and everything, for a meta target): moved as to_device moves them.
    to_device(module, target)
    return module


# --- re-pointing ----------------------------------------------------------------------------------


def _counterpart(base: torch.Tensor, meta: torch.Tensor | Ref) -> torch.Tensor:
    """The tensor on `base`'s storage with `meta`'s dtype and geometry."""
    if isinstance(meta, Ref):
        dtype, shape, stride, offset = meta.dtype, meta.shape, meta.stride, meta.offset
    else:
        dtype, shape, offset = meta.dtype, tuple(meta.shape), meta.storage_offset()
        stride = tuple(meta.stride())
    if (
        base.dtype == dtype
        and tuple(base.shape) == shape
        and tuple(base.stride()) == stride
        and base.storage_offset() == offset
    ):
        return base
    if base.dtype == dtype:
        return base.as_strided(shape, stride, offset)
    view = torch.empty(0, dtype=dtype, device=base.device)
    return view.set_(base.untyped_storage(), offset, shape, stride)


def _new_tensor(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """`data` dressed as `old` was: the same class, `requires_grad` and attributes."""
    data = data.detach()
    new: torch.Tensor
    if isinstance(old, torch.nn.Parameter):
        new = torch.nn.Parameter(data, requires_grad=old.requires_grad)
        if type(old) is not torch.nn.Parameter:
            new.__class__ = type(old)
    else:
        new = data.requires_grad_(old.requires_grad)
        if type(old) is not torch.Tensor:
            new = new.as_subclass(type(old))
    for name, value in vars(old).items():
        vars(new).setdefault(name, value)
    return new


def _repoint(
    metas: dict[int, tuple[torch.Tensor, list[_Slot]]], real: dict[int, torch.Tensor]
) -> None:
    for old, slots in metas.values():
        new = _new_tensor(old, _counterpart(real[storage_key(old)], old))
        for slot in slots:
            slot.entries[slot.name] = new


# --- init=None and "reset" ------------------------------------------------------------------------


def _allocated(
    metas: dict[int, tuple[torch.Tensor, list[_Slot]]], target: torch.device
) -> dict[int, torch.Tensor]:
    """One uninitialised storage on `target` per meta storage, as a tensor covering it."""
    real: dict[int, torch.Tensor] = {}
    shared: dict[int, int] = {}
    for tensor, _ in metas.values():
        key = storage_key(tensor)
        shared[key] = shared.get(key, 0) + 1
    for tensor, _ in metas.values():
        key = storage_key(tensor)
        if key in real:
            continue
        nbytes = tensor.untyped_storage().nbytes()
        size = tensor.element_size()
        if shared[key] == 1 and covers_storage(tensor):
            real[key] = torch.empty_strided(
                tensor.shape, tensor.stride(), dtype=tensor.dtype, device=target
            )
        elif nbytes % size == 0:
            real[key] = torch.empty(nbytes // size, dtype=tensor.dtype, device=target)
        else:
            real[key] = torch.empty(nbytes, dtype=torch.uint8, device=target)
    return real


def _post_order(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """`named_modules()` with children before their parent, siblings in order, each once: the
    order eager construction finishes them in."""
    order: list[tuple[str, torch.nn.Module]] = []
    seen: set[int] = set()
    stack: list[tuple[str, torch.nn.Module, bool]] = [("", module, False)]
    while stack:
        prefix, current, expanded = stack.pop()
        if expanded:
            order.append((prefix, current))
            continue
        if id(current) in seen:
            continue
        seen.add(id(current))
        stack.append((prefix, current, True))
        children = [
            (f"{prefix}.{name}" if prefix else name, child)
            for name, child in current.named_children()
        ]
        stack.extend((name, child, False) for name, child in reversed(children))
    return order


def reset_function(module: torch.nn.Module) -> Callable[[], object] | None:
    """`module.reset_parameters`, else `module._reset_parameters`, where callable."""
    for name in ("reset_parameters", "_reset_parameters"):
        reset: Callable[[], object] | None = getattr(module, name, None)
        if callable(reset):
            return reset
    return None


def _reset(
    module: torch.nn.Module,
    metas: dict[int, tuple[torch.Tensor, list[_Slot]]],
    target: torch.device,
) -> None:
    """`reset_parameters()` per module, children first; warn about modules left out."""
    holders = {id(slot.module) for _, slots in metas.values() for slot in slots}
    missing: list[str] = []
    for prefix, submodule in _post_order(module):
        reset = reset_function(submodule)
        if reset is not None:
            with torch.no_grad():
                reset()
        elif id(submodule) in holders:
            name = f"{_ROOT}.{prefix}" if prefix else _ROOT
            missing.append(f"{name} ({type(submodule).__name__})")
    if missing:
        paths = tuple(missing)
        warnings.warn(
            MaterializeWarning(
                f"materialize({target}, init='reset'): {len(paths)} module(s) hold parameters "
                "or buffers but have no reset_parameters(), so their memory is left "
                f"uninitialised: {', '.join(paths)}. Initialise them yourself, or build the "
                "model under devicekit.deferred() and materialise it with init='replay'.",
                paths=tuple(path.split(" (")[0] for path in paths),
            ),
            stacklevel=3,
        )


# --- init="replay" --------------------------------------------------------------------------------


def _replayed(
    metas: dict[int, tuple[torch.Tensor, list[_Slot]]], target: torch.device
) -> dict[int, torch.Tensor]:
    """The real storages of `metas`, by replaying the recordings that made them."""
    groups: dict[int, tuple[Recording, dict[int, str]]] = {}
    for tensor, slots in metas.values():
        path = slots[0].path
        recording = recording_of(tensor)
        if recording is None:
            _raise_if_replaced(tensor, slots, target)
            raise MaterializeError(
                f"materialize({target}): {path} ({describe_tensor(tensor)}) was not made "
                "inside a devicekit.deferred() block (built under another meta context, or "
                "assigned after the block), so its initialisation cannot be replayed. Build "
                "the model inside devicekit.deferred(), or pass init='reset' to call "
                "reset_parameters(), or init=None for uninitialised memory.",
                path=path,
                op=None,
            )
        entry = groups.setdefault(id(recording), (recording, {}))
        entry[1].setdefault(storage_key(tensor), path)
    real: dict[int, torch.Tensor] = {}
    # In the order the blocks ran: eager construction drew from the generator in that order.
    for recording, needed in sorted(groups.values(), key=lambda entry: entry[0].serial):
        _check_unchanged(recording, needed, target)
        real.update(_Replay(recording, needed, target).run())
    return real


def _raise_if_replaced(tensor: torch.Tensor, slots: list[_Slot], target: torch.device) -> None:
    """Raise `MaterializeError` saying what happened to a tensor no recording made, where
    `replaced` can tell (a cast, a copy or an assignment after the block)."""
    for slot in slots:
        if slot.entries is vars(slot.module):
            continue
        found = replaced(slot.module, slot.name, tensor)
        if found is None:
            continue
        op, happened = found
        if op == "Module.to":
            fix = (
                f"do the cast inside the block (`with devicekit.deferred(): model = "
                f"Net().to({tensor.dtype})`), or materialise first and cast after "
                f"(`devicekit.materialize(model, {str(target)!r}).to({tensor.dtype})`)"
            )
        elif op == "copy.deepcopy":
            fix = (
                "copy inside the block (`with devicekit.deferred(): ...; copy = "
                "copy.deepcopy(model)`), or materialise first and copy after"
            )
        else:
            fix = "assign it inside the block, or materialise first and assign after"
        raise MaterializeError(
            f"materialize({target}): {slot.path} ({describe_tensor(tensor)}) was {happened}, "
            "and only what runs inside a devicekit.deferred() block is recorded, so its "
            f"values cannot be replayed. Fix: {fix}; or pass init='reset' or init=None.",
            path=slot.path,
            op=op,
        )


def _check_unchanged(recording: Recording, needed: dict[int, str], target: torch.device) -> None:
    for tensor, version in recording.versions:
        key = storage_key(tensor)
        if key in needed and int(tensor._version) != version:
            path = needed[key]
            raise MaterializeError(
                f"materialize({target}): {path} ({describe_tensor(tensor)}) was changed in "
                "place after its devicekit.deferred() block ended, and ops run outside the "
                "block are not recorded, so replaying would lose the change. Run that "
                "initialisation inside the block, or pass init='reset' or init=None and "
                "initialise the materialised model yourself.",
                path=path,
                op=None,
            )


class _Replay:
    """One replay of `recording` on `target`, for the storages in `needed`."""

    def __init__(self, recording: Recording, needed: dict[int, str], target: torch.device):
        self.recording = recording
        self.needed = needed
        self.target = target

    def plan(self) -> tuple[list[int], dict[int, int]]:
        """The indices of the ops to run, and the index of each storage's last use."""
        ops = self.recording.ops
        live = set(self.needed)
        kept: list[int] = []
        for index in range(len(ops) - 1, -1, -1):
            op = ops[index]
            if op.random or not live.isdisjoint(op.writes):
                kept.append(index)
                live |= op.reads
        kept.reverse()
        produced = self.recording.produced
        last: dict[int, int] = {}
        for index in kept:
            op = ops[index]
            for key in op.reads:
                made = produced.get(key)
                if made is None or made >= index:  # this op made it: a view of an unknown one
                    raise MaterializeError(
                        f"materialize({self.target}): the recorded {op.name} reads a meta "
                        "tensor that was not made inside its devicekit.deferred() block, so its "
                        f"value is unknown (it feeds {self._feeds(index)}). Create that tensor "
                        "inside the block, or pass init='reset' or init=None.",
                        path=self._feeds(index),
                        op=op.name,
                    )
                last[key] = index
            for key in op.writes:
                last[key] = index
        for key, path in self.needed.items():
            if key not in produced:
                raise MaterializeError(
                    f"materialize({self.target}): {path} was not created by a recorded op "
                    "(assigned after the devicekit.deferred() block ended?), so it cannot be "
                    "replayed. Assign it inside the block, or pass init='reset' or init=None.",
                    path=path,
                    op=None,
                )
        return kept, last

    def _feeds(self, start: int) -> str:
        """A path of a needed storage that the op at `start` writes, or that it feeds."""
        ops = self.recording.ops
        reached = set(ops[start].writes)
        for index in range(start, len(ops)):
            op = ops[index]
            if index > start and reached.isdisjoint(op.reads):
                continue
            reached |= op.writes
            for key in op.writes:
                if key in self.needed:
                    return self.needed[key]
        return "a temporary tensor"

    def run(self) -> dict[int, torch.Tensor]:
        kept, last = self.plan()
        if not kept:
            return {}
        ops = self.recording.ops
        draws = any(ops[index].random for index in kept)
        states = self.recording.start_states
        restore: torch.Tensor | None = None
        if draws:
            if self.target in states:  # replayed before: draw the same numbers again
                restore = _rng_state(self.target)
                _set_rng_state(self.target, states[self.target])
            else:
                states[self.target] = _rng_state(self.target)
        real: dict[int, torch.Tensor] = {}
        default_dtype = torch.get_default_dtype()
        try:
            with torch.no_grad():
                for index in kept:
                    op = ops[index]
                    if op.default_dtype != torch.get_default_dtype():
                        torch.set_default_dtype(op.default_dtype)
                    self.step(op, index, real)
                    for key in op.reads | op.writes:
                        if last.get(key) == index and key not in self.needed:
                            real.pop(key, None)
        finally:
            torch.set_default_dtype(default_dtype)
            if restore is not None:
                _set_rng_state(self.target, restore)
        return real

    def step(self, op: Op, index: int, real: dict[int, torch.Tensor]) -> None:
        target = self.target

        def convert(value: Any) -> Any:
            if isinstance(value, Ref):
                return _counterpart(real[value.key], value)
            if isinstance(value, torch.device) and value.type == "meta":
                return target
            return value

        args = tree_map(convert, op.args)
        kwargs = tree_map(convert, op.kwargs)
        if kwargs.get("device") == "meta":
            kwargs["device"] = target
        try:
            result = op.func(*args, **kwargs)
        except Exception as error:
            feeds = self._feeds(index)
            raise MaterializeError(
                f"materialize({target}): replaying {op.name} (recorded op {index + 1} of "
                f"{len(self.recording.ops)}, feeding {feeds}) failed with "
                f"{type(error).__name__}: {_first_line(error)}. The original error is attached "
                "as __cause__.",
                path=feeds,
                op=op.name,
            ) from error
        outputs, _ = tree_flatten(result)
        for old, new in zip(op.outputs, outputs, strict=False):
            if isinstance(old, Ref) and isinstance(new, torch.Tensor):
                real.setdefault(old.key, new)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    state: torch.Tensor = getattr(torch, device.type).get_rng_state(device)
    return state


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)
