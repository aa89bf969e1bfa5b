"""`device_guard()`: catch, report or repair torch ops that mix devices.

A torch function mode sees every torch op run inside the block (functions, methods, operators,
`nn.functional`, indexing) with its arguments. The check on each op is one hand-written pass over
the arguments and the lists or tuples among them, comparing devices (by `.is_cpu` while all are
on the CPU, which builds no `torch.device`); only a call that mixes devices goes on to the slower
path that applies the exceptions (0-dim CPU tensors, index tensors on the CPU), formats the
report, and applies the policy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import torch
from torch.overrides import TorchFunctionMode
from typing_extensions import ParamSpec

from devicekit import _context
from devicekit._backward import CoveredModeKind
from devicekit._describe import (
    CallSite,
    called_at,
    labelled_tensors,
    op_name_at,
    user_call_site,
)
from devicekit._errors import (
    DeviceMismatchWarning,
    DeviceMoveWarning,
    InvalidArgumentError,
)
from devicekit._provenance import FACTORIES, MOVES, keep, record
from devicekit._report import Report
from devicekit._resolve import resolve
from devicekit._scope import Scoped
from devicekit._types import DeviceLike

__all__ = ["GuardPolicy", "choose_device", "device_guard"]

#: What `device_guard` does with an op that mixes devices.
GuardPolicy = Literal["error", "warn", "move"]

P = ParamSpec("P")
R = TypeVar("R")

_Tensor = torch.Tensor
_SEQUENCES = (list, tuple)
_CPU = torch.device("cpu")


@dataclass
class _GuardState:
    policy: GuardPolicy
    target: torch.device | None
    reported: set[tuple[str, int]] = field(default_factory=set)


#: The innermost active `device_guard` of this thread or asyncio task (`None`: none active).
_ACTIVE_GUARD: ContextVar[_GuardState | None] = ContextVar("devicekit_device_guard", default=None)


def _existing(functions: Iterable[str], owner: object) -> set[object]:
    return {getattr(owner, name) for name in functions if hasattr(owner, name)}


# Explicit transfers and the plumbing of `Module.to`: tensors on different devices are their point.
_TRANSFERS: frozenset[object] = frozenset(
    _existing(
        (
            "to",
            "cpu",
            "cuda",
            "xpu",
            "mps",
            "copy_",
            "type",
            "pin_memory",
            "new_tensor",
            "set_",
            "is_set_to",
            "__deepcopy__",
            "__reduce_ex__",
            "__setstate__",
        ),
        torch.Tensor,
    )
    | _existing(
        ("as_tensor", "tensor", "_has_compatible_shallow_copy_type", "_foreach_copy_"), torch
    )
    | {torch.Tensor.data.__set__}  # type: ignore[attr-defined]
)

# Indexing follows CUDA's rule: index tensors may live on the CPU or on the indexed tensor's device.
_INDEXING: frozenset[object] = frozenset(
    _existing(("__getitem__", "__setitem__", "index_put", "index_put_"), torch.Tensor)
    | {torch.index_put, torch.index_put_}
)
_INDEX_LABELS = ("key", "indices")


# What each argument type is to the check, cached per type. Plain tensors and `nn.Parameter`s
# (whose `.is_cpu` and `.device` are torch's own) are tested for first; lists and tuples are
# scanned one level deep; other tensor subclasses, which may answer `.device` themselves, send
# the call to `_checked`, which reads nothing but `.device`.
_SEQUENCE, _SUBCLASS, _OTHER = "sequence", "subclass", "other"
_KINDS: dict[type, str] = {list: _SEQUENCE, tuple: _SEQUENCE, torch.Size: _OTHER}
_Parameter = torch.nn.Parameter


def _kind(kind: type) -> str:
    if issubclass(kind, torch.Tensor):
        found = _SUBCLASS
    else:
        found = _SEQUENCE if issubclass(kind, _SEQUENCES) else _OTHER
    _KINDS[kind] = found
    return found


class _DeviceGuardMode(TorchFunctionMode):
    """Checks the devices of every op's tensor arguments while a `device_guard` is active."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # The check runs on every op, so it is written for speed: one pass over the arguments
        # and the items of lists and tuples among them, allocating nothing unless a keyword
        # argument holds tensors (most hold flags and sizes), and `func` is called without
        # building a `kwargs` dict. `seen` is what the tensors so far have in common: `None`
        # before the first one, the first tensor itself (most ops take one tensor, whose device
        # nobody needs), then `True` while all are on the CPU (`.is_cpu` answers without
        # building a `torch.device`), or else `False`, with their common `device`. The first
        # tensor that breaks it sends the call to `_mixed`, which decides whether that is a
        # violation and whether a guard is active in this context at all.
        __tracebackhide__ = True  # pytest shows the user's line, not devicekit's internals
        scanned = args
        if kwargs:
            for arg in kwargs.values():
                kind = type(arg)
                if (
                    kind is _Tensor
                    or kind is _Parameter
                    or (_KINDS.get(kind) or _kind(kind)) is not _OTHER
                ):
                    scanned = (*args, *kwargs.values())
                    break
        seen: Any = None
        device = None
        for arg in scanned:
            kind = type(arg)
            if kind is _Tensor or kind is _Parameter:
                if seen is True:
                    if not arg.is_cpu:
                        return _mixed(func, args, kwargs)
                elif seen is None:
                    seen = arg
                elif seen is False:
                    if arg.device != device:
                        return _mixed(func, args, kwargs)
                elif arg.is_cpu:
                    if not seen.is_cpu:
                        return _mixed(func, args, kwargs)
                    seen = True
                else:
                    device, seen = seen.device, False
                    if arg.device != device:
                        return _mixed(func, args, kwargs)
                continue
            what = _KINDS.get(kind) or _kind(kind)
            if what is _OTHER:
                continue
            if what is _SUBCLASS:
                return _checked(func, args, kwargs)
            # The same steps for the items of a list or tuple, written out again on purpose:
            # a function call per tensor would cost more than the whole check.
            for item in arg:
                kind = type(item)
                if kind is _Tensor or kind is _Parameter:
                    if seen is True:
                        if not item.is_cpu:
                            return _mixed(func, args, kwargs)
                    elif seen is None:
                        seen = item
                    elif seen is False:
                        if item.device != device:
                            return _mixed(func, args, kwargs)
                    elif item.is_cpu:
                        if not seen.is_cpu:
                            return _mixed(func, args, kwargs)
                        seen = True
                    else:
                        device, seen = seen.device, False
                        if item.device != device:
                            return _mixed(func, args, kwargs)
                elif (_KINDS.get(kind) or _kind(kind)) is _SUBCLASS:
                    return _checked(func, args, kwargs)
        if func in _RECORDED:  # a tensor factory or a move: where it ran is kept
            result = func(*args, **kwargs) if kwargs else func(*args)
            if func in FACTORIES:
                record(func, result)
            elif args and type(result) is _Tensor and result is not args[0]:
                keep(func, args[0], result)  # a move, or a `.to(dtype)` keeping the record
            return result
        return func(*args, **kwargs) if kwargs else func(*args)


#: The ops whose results `devicekit._provenance` records while a guard is active.
_RECORDED = FACTORIES | MOVES


def _checked(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
    """Run `func` once the `.device` of every tensor among the arguments, and in lists or tuples
    among them, matches the first one's; a call that mixes devices goes on to `_mixed`."""
    __tracebackhide__ = True
    device = None
    for value in _scanned(args, kwargs or {}):
        if isinstance(value, _Tensor):
            if device is None:
                device = value.device
            elif value.device != device:
                return _mixed(func, args, kwargs)
    return func(*args, **kwargs) if kwargs else func(*args)


def _scanned(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    """The arguments, with the items of lists and tuples among them in their place."""
    for group in (args, kwargs.values()):
        for arg in group:
            if isinstance(arg, _SEQUENCES):
                yield from arg
            else:
                yield arg


def _is_cpu_scalar(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dim() == 0


def _is_in_place(func: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    if isinstance(kwargs.get("out"), torch.Tensor):
        return True
    name = getattr(func, "__name__", "")
    if name.startswith("__"):
        return name.startswith("__i") or name == "__setitem__"
    return name.endswith("_")


@dataclass
class _Call:
    """A call that mixes devices, as the slow path sees it."""

    func: Callable[..., Any]
    operands: list[tuple[str, torch.Tensor]]
    devices: list[torch.device]  # distinct, in order of appearance, 0-dim CPU tensors left out
    home: torch.device | None  # where an in-place or indexing op's destination lives
    site: CallSite | None
    in_place: bool = False  # whether `home` must stay where it is (in-place ops, `out=`)

    @property
    def op(self) -> str:
        return op_name_at(self.func, self.site.line if self.site is not None else "")

    def report(self, target: torch.device | None) -> Report:
        """The report of this call, its offending operands those not on `target` (all of the
        relevant ones when `target` is `None`)."""
        __tracebackhide__ = True
        if target is None:
            strays = [label for label, _ in _relevant(self.func, self.operands, self.home)]
        else:
            strays = [label for label, _ in _strays(self, target)]
        return Report(
            self.op,
            self.operands,
            devices=self.devices,
            target=target,
            block="device_guard",
            strays=strays,
        )


def _examine(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    operands = list(labelled_tensors(func, args, kwargs))
    name = getattr(func, "__name__", "")
    if name == "_nested_view_from_jagged":
        operands = _without_nested_auxiliary(operands, args, kwargs)
    elif name.startswith("_foreach_"):
        operands = _foreach_mix(func, operands)
    home = None
    in_place = _is_in_place(func, kwargs)
    if func in _INDEXING or in_place:
        destination = kwargs.get("out")
        if not isinstance(destination, torch.Tensor) and operands:
            destination = operands[0][1]
        home = destination.device if isinstance(destination, torch.Tensor) else None
    devices: list[torch.device] = []
    for _label, tensor in _relevant(func, operands, home):
        if tensor.device not in devices:
            devices.append(tensor.device)
    return _Call(func, operands, devices, home, user_call_site(), in_place)


# torch's own arguments of a jagged nested tensor's view that never live with its data: a `meta`
# dummy and CPU-held sequence lengths (positions and names in `_nested_view_from_jagged`).
_NESTED_AUXILIARY = ((2, "dummy"), (5, "min_seqlen"), (6, "max_seqlen"))


def _without_nested_auxiliary(
    operands: list[tuple[str, torch.Tensor]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    auxiliary = {
        id(value)
        for position, name in _NESTED_AUXILIARY
        for value in (args[position] if position < len(args) else None, kwargs.get(name))
        if value is not None
    }
    return [(label, tensor) for label, tensor in operands if id(tensor) not in auxiliary]


def _foreach_mix(
    func: Callable[..., Any], operands: list[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """The operands of a `torch._foreach_*` call that must share a device: CUDA groups the
    lists' tensors by device, so only tensors at the same list position (and the arguments
    that are no lists) must match. The first position that mixes devices, or none."""
    positions: dict[str, list[tuple[str, torch.Tensor]]] = {}
    loose: list[tuple[str, torch.Tensor]] = []
    for label, tensor in operands:
        if label.endswith("]"):
            positions.setdefault(label[label.rindex("[") :], []).append((label, tensor))
        else:
            loose.append((label, tensor))
    for group in positions.values():
        together = group + loose
        if len({tensor.device for _, tensor in _relevant(func, together, None)}) > 1:
            return together
    return loose if positions else operands


def _relevant(
    func: Callable[..., Any], operands: list[tuple[str, torch.Tensor]], home: torch.device | None
) -> Iterable[tuple[str, torch.Tensor]]:
    """The operands whose device must match; index tensors on the CPU and scalars mix freely."""
    indexing = func in _INDEXING
    for label, tensor in operands:
        if _is_cpu_scalar(tensor):
            continue
        if indexing and label.startswith(_INDEX_LABELS) and tensor.device in (_CPU, home):
            continue
        if indexing and label == "value":  # `t[i] = v` copies `v` from wherever it lives
            continue
        yield label, tensor


def _is_violation(call: _Call) -> bool:
    if call.home is not None and call.func in _INDEXING:
        return any(device != call.home for device in call.devices)
    return len(call.devices) > 1


def _target(call: _Call, state: _GuardState) -> torch.device | None:
    """Where the op should run: `None` where that is ambiguous."""
    if call.home is not None and (call.in_place or call.home.type != "cpu"):
        # In-place and `out=` ops run where their destination lives, and so does indexing a
        # tensor on an accelerator; a CPU tensor indexed by an accelerator's index goes to it.
        return call.home
    return choose_device(call.devices, state.target)


def choose_device(
    devices: Iterable[torch.device], explicit: torch.device | None
) -> torch.device | None:
    """Where mixed operands go: `explicit`, else the innermost `default_device`, else the one
    non-CPU device among `devices`, else the CPU if that is all there is; `None` if ambiguous.

    Example:
        >>> import torch
        >>> choose_device([torch.device("cpu"), torch.device("meta")], None)
        device(type='meta')
    """
    if explicit is not None:
        return explicit
    default = _context._block_device()
    if default is not None:
        return default
    found = list(dict.fromkeys(devices))
    accelerators = [device for device in found if device.type != "cpu"]
    if len(accelerators) == 1:
        return accelerators[0]
    if not accelerators:
        return found[0] if found else None
    return None


def _strays(call: _Call, target: torch.device) -> list[tuple[str, torch.Tensor]]:
    return [
        (label, tensor)
        for label, tensor in _relevant(call.func, call.operands, call.home)
        if tensor.device != target
    ]


def _first_at_site(call: _Call, state: _GuardState) -> bool:
    """Whether this is the first report from `call`'s line under this guard (then marked)."""
    if call.site is None:
        return True
    key = (call.site.filename, call.site.lineno)
    if key in state.reported:
        return False
    state.reported.add(key)
    return True


def _report(call: _Call, category: type[Warning], message: str) -> None:
    """Warn, pointing the warning at the user's line."""
    if call.site is None:
        warnings.warn(message, category, stacklevel=2)
    else:
        warnings.warn_explicit(message, category, call.site.filename, call.site.lineno)


def _mixed(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
    __tracebackhide__ = True  # pytest shows the user's line, not devicekit's internals
    if kwargs is None:
        kwargs = {}
    state = _KIND.current()
    if state is None or func in _TRANSFERS:  # another task's guard, or an explicit transfer
        return func(*args, **kwargs)
    # `.device` is read through the torch function modes below this one, so that a mode that
    # reports devices of its own (`devicekit.simulated_devices`) is believed.
    call = _examine(func, args, kwargs)
    if not _is_violation(call):
        return func(*args, **kwargs)
    target = _target(call, state)
    if state.policy == "warn":
        if _first_at_site(call, state):
            _report(call, DeviceMismatchWarning, call.report(target).body())
        return func(*args, **kwargs)
    if state.policy == "error" or target is None:
        raise call.report(target).error()
    strays = _strays(call, target)
    moved: dict[int, torch.Tensor] = {}
    for label, tensor in strays:
        try:
            moved[id(tensor)] = tensor.to(target)
        except (RuntimeError, NotImplementedError) as error:
            raise call.report(target).error(
                fix=f'device_guard("move") cannot run it on {target}: moving '
                f"{label} there failed ({type(error).__name__}: {error}).\n"
                f"Fix: move the operands to one device yourself first, with "
                f"`devicekit.to_device`."
            ) from error
    if _first_at_site(call, state):
        labels = ", ".join(label for label, _ in strays)
        _report(
            call,
            DeviceMoveWarning,
            f'device_guard("move") moved {labels} to {target} to run {call.op}, '
            f"{called_at(call.site)}.\n"
            "Each call copies them again: move them once with `devicekit.to_device`, or "
            "silence this with "
            '`warnings.filterwarnings("ignore", category=devicekit.DeviceMoveWarning)`.',
        )
    return func(*_replace(args, moved), **_replace(kwargs, moved))


def _replace(values: Any, moved: dict[int, torch.Tensor]) -> Any:
    """`values` (args or kwargs) with the moved tensors swapped in, one level deep as scanned."""

    def swap(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return moved.get(id(value), value)
        if isinstance(value, list):
            return [moved.get(id(v), v) if isinstance(v, torch.Tensor) else v for v in value]
        if type(value) is tuple:
            return tuple(moved.get(id(v), v) if isinstance(v, torch.Tensor) else v for v in value)
        return value

    if isinstance(values, dict):
        return {key: swap(value) for key, value in values.items()}
    return tuple(swap(value) for value in values)


_KIND = CoveredModeKind("device_guard()", _ACTIVE_GUARD, _DeviceGuardMode)  # backward too


class device_guard(Scoped[_GuardState]):
    """Check every torch op run inside the block for tensors on different devices.

    torch's own check misses many ops: `cpu @ meta`, `F.linear`, `embedding`, `index_select`,
    `a[idx]`, `gather`, `conv2d`, `einsum` and more accept the mix silently. Inside the block,
    every torch function, method, operator and indexing expression is checked, including tensors
    nested in list arguments (`torch.cat([a, b])`). 0-dim CPU tensors mix with any device, as CUDA
    allows; index tensors may live on the CPU or on the indexed tensor's device; explicit
    transfers (`.to()`, `.cpu()`, `.cuda()`, `copy_`, `devicekit.to_device`) are never violations.

    Policies:

    - `"error"`: raise `CrossDeviceError` before the op runs, naming the op, each tensor operand
      with its compact form, the line of your code that called it, and the fix.
    - `"warn"`: issue `DeviceMismatchWarning` once per call site, then run the op as torch would.
    - `"move"`: move stray operands before the op runs, to `target`, else to the innermost
      `default_device`, else to the one non-CPU device among the operands (an in-place op, or
      one with `out=`, runs where its destination lives). Each call site that moved something
      is reported once with `DeviceMoveWarning`. Operands on two accelerators and no target to
      choose between them raise `CrossDeviceError`.

    Works as a context manager and as a decorator of functions and coroutine functions. The
    setting is seen by the thread or asyncio task that entered it (and tasks it creates), nests,
    and is restored when the block exits, also by an exception. It composes with
    `default_device` and with your own torch function modes. With no guard active, devicekit
    adds nothing to torch ops.

    Args:
        policy: `"error"`, `"warn"` or `"move"`.
        target: Where `"move"` runs mixed ops; `None` to use the rule above.

    Raises:
        ValueError: `policy` is not one of the three.

    Example:
        >>> import torch, devicekit
        >>> x, w = torch.ones(2, 3), torch.ones(4, 3, device="meta")
        >>> with devicekit.device_guard():
        ...     torch.nn.functional.linear(x, w)
        Traceback (most recent call last):
        ...
        devicekit._errors.CrossDeviceError: Expected all tensors to be on the same device, but found at least two devices, cpu and meta!
        ...
    """  # noqa: E501

    kind = _KIND

    def __init__(self, policy: GuardPolicy = "error", *, target: DeviceLike = None) -> None:
        if policy not in get_args(GuardPolicy):
            raise InvalidArgumentError(
                f"device_guard: unknown policy {policy!r}; expected 'error', 'warn' or 'move'."
            )
        self.policy: GuardPolicy = policy
        self.target = None if target is None else resolve(target, operation="device_guard")
        self._reported: set[tuple[str, int]] = set()

    def __repr__(self) -> str:
        target = "" if self.target is None else f", target={str(self.target)!r}"
        return f"device_guard({self.policy!r}{target})"

    def _value(self) -> _GuardState:
        return _GuardState(self.policy, self.target, self._reported)
