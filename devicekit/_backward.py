"""Backward passes under devicekit's checks: the Python code autograd runs sees the modes.

The autograd engine runs the Python code of a backward pass (a custom `autograd.Function`'s
`backward`, tensor hooks, module backward hooks, the recomputation of a checkpointed region)
with the torch function modes of the thread-local state it captured when the pass started. A
pass started by `loss.backward()` inside a guard or a simulation starts in that mode's own
handler, where torch has taken the mode off the stack while the handler runs: so the engine
captured a stack without it, and none of that code was checked.

While a `device_guard` block or a simulation is active, `torch.autograd`'s entry into the
engine (`_engine_run_backward`, under both `backward()` and `autograd.grad()`) puts back the
simulation's mode and this thread's active guards' modes that are missing from the stack, for
the length of the pass, so every Python op of the pass is seen. Under a simulation the engine
also hands Python code gradients it computed in C++, which are plain CPU tensors: the
simulation's `gradient_patches` give them the simulated device of the tensor each belongs to
(a custom function's outputs and inputs, recorded when it ran forward; the tensor a hook was
registered on), as on a GPU, where a gradient lives with its tensor.

Not covered: hooks registered on the nodes of built-in ops (`y.grad_fn.register_hook(fn)`
where `grad_fn` is, say, `MulBackward0`: a C++ class devicekit cannot wrap) receive plain CPU
gradients under a simulation, and hooks registered before the simulation began receive them too.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
import torch.autograd.graph
from torch.autograd.function import BackwardCFunction, Function, FunctionCtx
from torch.overrides import TorchFunctionMode

from devicekit import _modes
from devicekit._modes import ModeKind
from devicekit._scope import Record, locked

__all__ = ["CoveredModeKind", "gradient_patches", "holders"]

S = TypeVar("S")

#: The kinds of block whose modes a backward pass re-enters (`device_guard`'s).
_KINDS: list[ModeKind[Any]] = []


class _Holders:
    """Who needs backward passes covered: guard blocks (`blocks`, the ids of their records,
    through `CoveredModeKind`: an id, not the record, so that a record an interrupt left held is
    still collected and lets go in `Record.__del__`) and the active simulation (`simulation`),
    which the simulation sets as one of its patches, so its undo clears it. Every change puts the
    engine wrapper in place or takes it away."""

    blocks: set[int]
    simulation: Any

    def __init__(self) -> None:
        object.__setattr__(self, "blocks", set())
        object.__setattr__(self, "simulation", None)

    # Every change runs under `locked`: an interrupt landing inside `with _lock:` could leave
    # the lock held for good, and every other thread's guard would then wait on it forever.

    def __setattr__(self, name: str, value: object) -> None:
        _changed(functools.partial(object.__setattr__, self, name, value))

    def __delattr__(self, name: str) -> None:
        def change() -> None:
            object.__delattr__(self, name)
            if name == "simulation":
                object.__setattr__(self, name, None)

        _changed(change)

    def add(self, record: Record) -> None:
        _changed(functools.partial(self.blocks.add, id(record)))

    def discard(self, record: Record) -> None:
        _changed(functools.partial(self.blocks.discard, id(record)))


def _changed(change: Callable[[], object]) -> None:
    """`change`, then `_sync`, under `_lock`."""

    def work() -> None:
        change()
        _sync()

    locked(_lock, work)


_lock = threading.RLock()
holders = _Holders()

#: The modules that hold `_engine_run_backward` (`torch.autograd` imports it by name).
_ENGINE_HOLDERS = (torch.autograd, torch.autograd.graph)
_ENGINE_ENTRY = "_engine_run_backward"
_engine_run_backward: Callable[..., Any] = torch.autograd.graph._engine_run_backward


def _sync() -> None:
    """Wrap the engine's entry while anyone holds the coverage, and only then (under `_lock`)."""
    wanted = bool(holders.blocks) or holders.simulation is not None
    for module in _ENGINE_HOLDERS:
        if wanted:
            setattr(module, _ENGINE_ENTRY, _run_backward)
        elif getattr(module, _ENGINE_ENTRY, None) is _run_backward:
            setattr(module, _ENGINE_ENTRY, _engine_run_backward)


def _missing_modes() -> list[TorchFunctionMode]:
    """The modes a backward pass started here should run under that are not on the stack:
    the active simulation's, then this thread's active guards'."""
    wanted: list[TorchFunctionMode] = []
    mode = getattr(holders.simulation, "mode", None)
    if isinstance(mode, TorchFunctionMode):
        wanted.append(mode)
    if holders.blocks:
        users = _modes.users()
        for kind in _KINDS:
            if kind.current() is not None:
                found = users.modes.get(kind.mode)
                if found is not None:
                    wanted.append(found)
    if not wanted:
        return wanted
    stack = _modes._stack()
    return [mode for mode in wanted if not _modes._contains(stack, mode)]


@contextlib.contextmanager
def modes_off() -> Iterator[None]:
    """This thread's torch function modes without devicekit's, put back afterwards (compiled
    code under a simulation runs so, forward and backward)."""
    saved = _modes._stack()
    kept = [mode for mode in saved if not _is_devicekits(mode)]
    if len(kept) == len(saved):
        yield
        return
    _modes._rebuild(kept)
    try:
        yield
    finally:
        _modes._rebuild(saved)


def _is_devicekits(mode: object) -> bool:
    return type(mode).__module__.startswith("devicekit.")


def _run_backward(*args: Any, **kwargs: Any) -> Any:
    """`torch.autograd.graph._engine_run_backward` with devicekit's modes on the stack, so the
    engine captures them for the Python code it runs (see the module docstring)."""
    __tracebackhide__ = True
    missing = _missing_modes()
    if not missing:
        return _engine_run_backward(*args, **kwargs)
    for mode in missing:
        _modes.push(mode)
    try:
        return _engine_run_backward(*args, **kwargs)
    finally:
        for mode in reversed(missing):
            _modes.remove(mode)


class CoveredModeKind(ModeKind[S]):
    """A `ModeKind` whose blocks also cover the backward passes started inside them."""

    def __init__(self, name: str, value: ContextVar[S | None], mode: type[TorchFunctionMode]):
        super().__init__(name, value, mode)
        _KINDS.append(self)

    def hold(self, record: Record) -> None:
        super().hold(record)
        holders.add(record)

    def release(self, record: Record) -> None:
        try:
            super().release(record)
        finally:
            holders.discard(record)


# --- gradients under a simulation ----------------------------------------------------------------

#: Where a custom function's node keeps the simulated devices of its forward's inputs and
#: outputs (one entry per argument or output, `None` where there was no simulated tensor), and
#: whether its forward ran under devicekit's modes (compiled code runs without them: its
#: backward then does too).
_DEVICES = "_devicekit_devices"
#: Where a custom function's node keeps the simulated devices of the tensors it saved.
_SAVED = "_devicekit_saved"
#: Marks the hooks wrapped here, so that a hook is never wrapped twice.
_WRAPPED = "_devicekit_gradients"

Tag = Callable[[torch.Tensor, torch.device], None]
DeviceOf = Callable[[torch.Tensor], "torch.device | None"]


def gradient_patches(device_of: DeviceOf, tag: Tag) -> dict[tuple[object, str], object]:
    """The replacements that give gradients entering Python code the simulated device of their
    tensor: `device_of(tensor)` says a tensor's simulated device, `tag(tensor, device)` gives
    it one. The simulation installs them with its other patches."""
    function_apply: Callable[..., Any] = Function.__dict__["apply"].__func__
    backward_apply: Callable[..., Any] = BackwardCFunction.apply
    backward_apply_boxed: Callable[..., Any] = BackwardCFunction.apply_boxed
    node_hook: Callable[..., Any] = torch._C._FunctionBase.register_hook
    node_prehook: Callable[..., Any] = torch._C._FunctionBase.register_prehook
    tensor_hook: Callable[..., Any] = torch.Tensor.register_hook
    save: Callable[..., Any] = FunctionCtx.save_for_backward
    saved: Any = torch._C._FunctionBase.saved_tensors  # a getset descriptor

    def tagged(tensors: Sequence[Any], devices: Sequence[torch.device | None]) -> None:
        """Tag each untagged tensor with the device at its position (one device for all when
        the counts differ and the recorded tensors were on one device)."""
        if len(tensors) != len(devices):
            found = {device for device in devices if device is not None}
            if len(found) != 1:
                return
            devices = [next(iter(found))] * len(tensors)
        for tensor, device in zip(tensors, devices, strict=True):
            if (
                device is not None
                and isinstance(tensor, torch.Tensor)
                and device_of(tensor) is None
            ):
                tag(tensor, device)

    def recorded(node: object, which: int) -> Sequence[torch.device | None]:
        devices = getattr(node, "__dict__", {}).get(_DEVICES)
        return () if devices is None else devices[which]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        """`Function.apply`: records on the new node where its inputs and outputs are."""
        outputs = function_apply(cls, *args, **kwargs)
        produced = outputs if isinstance(outputs, tuple) else (outputs,)
        node: object = next(
            (item.grad_fn for item in produced if isinstance(item, torch.Tensor)), None
        )
        if isinstance(node, BackwardCFunction):
            stack = _modes._stack()
            vars(node)[_DEVICES] = (
                tuple(device_of(a) if isinstance(a, torch.Tensor) else None for a in args),
                tuple(device_of(o) if isinstance(o, torch.Tensor) else None for o in produced),
                any(_is_devicekits(mode) for mode in stack),
            )
        return outputs

    def backward_of(run: Callable[..., Any]) -> Callable[..., Any]:
        def backward(self: BackwardCFunction, *grads: Any) -> Any:
            """A custom function's backward: its gradients where its forward's outputs were,
            and run off devicekit's modes when its forward was (compiled code)."""
            devices = vars(self).get(_DEVICES)
            if devices is None:
                return run(self, *grads)
            if not devices[2]:
                with modes_off():
                    return run(self, *grads)
            boxed = len(grads) == 1 and type(grads[0]) is list  # `boxed_grads_call` functions
            tagged(grads[0] if boxed else grads, devices[1])
            return run(self, *grads)

        return backward

    def save_for_backward(self: FunctionCtx, *tensors: Any) -> Any:
        """`ctx.save_for_backward`: records where the tensors are (`saved_tensors` may hand
        back new tensor objects)."""
        vars(self)[_SAVED] = tuple(
            device_of(item) if isinstance(item, torch.Tensor) else None for item in tensors
        )
        return save(self, *tensors)

    def saved_tensors(self: BackwardCFunction) -> Any:
        found = saved.__get__(self)
        tagged(found, vars(self).get(_SAVED, ()))
        return found

    def register_hook(self: BackwardCFunction, hook: Callable[..., Any]) -> Any:
        """A hook on a custom function's node (how module backward hooks are run)."""
        if getattr(hook, _WRAPPED, False):
            return node_hook(self, hook)

        def run(grad_inputs: Any, grad_outputs: Any) -> Any:
            tagged(grad_inputs, recorded(self, 0))
            tagged(grad_outputs, recorded(self, 1))
            return hook(grad_inputs, grad_outputs)

        setattr(run, _WRAPPED, True)
        return node_hook(self, run)

    def register_prehook(self: BackwardCFunction, hook: Callable[..., Any]) -> Any:
        if getattr(hook, _WRAPPED, False):
            return node_prehook(self, hook)

        def run(grad_outputs: Any) -> Any:
            tagged(grad_outputs, recorded(self, 1))
            return hook(grad_outputs)

        setattr(run, _WRAPPED, True)
        return node_prehook(self, run)

    def register_tensor_hook(self: torch.Tensor, hook: Callable[..., Any]) -> Any:
        """`Tensor.register_hook`: the hook's gradient is where the tensor is."""
        device = device_of(self)
        if device is None or getattr(hook, _WRAPPED, False):
            return tensor_hook(self, hook)

        def run(grad: Any) -> Any:
            tagged((grad,), (device,))
            return hook(grad)

        setattr(run, _WRAPPED, True)
        return tensor_hook(self, run)

    return {
        (Function, "apply"): classmethod(apply),
        (BackwardCFunction, "apply"): backward_of(backward_apply),
        (BackwardCFunction, "apply_boxed"): backward_of(backward_apply_boxed),
        (FunctionCtx, "save_for_backward"): save_for_backward,
        (BackwardCFunction, "saved_tensors"): property(saved_tensors),
        (BackwardCFunction, "register_hook"): register_hook,
        (BackwardCFunction, "register_prehook"): register_prehook,
        (torch.Tensor, "register_hook"): register_tensor_hook,
    }
