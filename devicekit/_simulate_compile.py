"""`torch.compile` under a simulation: compiled code runs on plain CPU tensors.

TorchDynamo traces through the torch function modes on the stack (it inlines them), and it
cannot trace devicekit's: a compiled model would fail inside the simulation's bookkeeping. So
while a simulation is active, `torch.compile` hands back its compiled model or function
wrapped in a runner that, on each call,

1. checks the devices of the tensors in the arguments (and of a module's parameters and
   buffers) with the simulation's rule (0-dim CPU tensors mix with any device);
2. when they are all on one device, runs the compiled code with devicekit's modes taken off
   this thread's stack, so the backend (inductor, eager, aot_eager ...) compiles and runs it
   for the CPU, and gives the tensors it returns the simulated device;
3. when they are on different devices, runs the original, uncompiled code under the
   simulation instead, so a cross-device bug inside `forward` raises the same
   `CrossDeviceError`, naming the op, as without `torch.compile` (and code that moves tensors
   between devices on purpose still runs, eagerly);
4. under `torch.autocast("cuda")`, or when the compiled code enters `torch.autocast` itself
   (its code or a submodule's `forward` names it), runs the original code under the
   simulation too, which applies CUDA's autocast policy op by op (compiled for the CPU, the
   graph would ignore CUDA autocast and compute in float32).

Code that names a simulated device itself inside the compiled region (`torch.ones(3,
device="cuda")`) cannot be compiled for the CPU: the first such failure makes that callable run
eagerly under the simulation from then on. Results equal the CPU run's: the same backend
compiles the same graph for the CPU. Modules compiled before the simulation began are run the
same way. What dynamo compiled during a simulation assumed its devices, so the simulation
resets dynamo's caches when it ends (or pauses) if compiled code ran: the same compiled code
then compiles again for the CPU outside it.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree

from devicekit import _backward, _simulate_mode, _simulate_threads

__all__ = ["compile_patch", "patches"]


# What a CPU build (or dynamo's fake tensors) say when compiled code names a device itself.
_NAMES_A_DEVICE = (
    "Torch not compiled with CUDA enabled",
    "Cannot access accelerator device",
    "is not linked with support for",
    "Expected all tensors to be on the same device",
    _simulate_threads.BELOW_THE_SIMULATION,  # torch's C++ asked for a real device
)


class _Compiled:
    """Whether compiled code ran during the active simulation. The simulation sets `active` as
    one of its patches; when it is set back (the simulation ends or pauses) after compiled code
    ran, TorchDynamo's caches are reset: what dynamo compiled then assumed the simulated
    devices (its frames ask the accelerator for its current stream), and would fail outside."""

    active: bool
    ran: bool

    def __init__(self) -> None:
        object.__setattr__(self, "active", False)
        object.__setattr__(self, "ran", False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name == "active" and not value:
            self._forget()

    def __delattr__(self, name: str) -> None:
        object.__setattr__(self, name, False)
        self._forget()

    def _forget(self) -> None:
        dynamo = sys.modules.get("torch._dynamo")
        if self.ran and dynamo is not None:
            object.__setattr__(self, "ran", False)
            dynamo.reset()


state = _Compiled()


def patches() -> dict[tuple[object, str], object]:
    """What a simulation replaces: `torch.compile`, and the call of modules compiled before it."""
    found: dict[tuple[object, str], object] = {(torch, "compile"): compile_patch(torch.compile)}
    found[(state, "active")] = True
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None:  # modules may have been compiled before the simulation began
        optimized = eval_frame.OptimizedModule
        found[(optimized, "__call__")] = _precompiled_call(optimized.__dict__["__call__"])
    return found


def _precompiled_call(original: Callable[..., Any]) -> Callable[..., Any]:
    """`OptimizedModule.__call__` for modules compiled before the simulation began."""

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.forward, _Runner):  # compiled inside the simulation
            return original(self, *args, **kwargs)
        runner = self.__dict__.get(_RUNNER)
        if runner is None:
            compiled = functools.partial(original, self)
            runner = _Runner(compiled, self._orig_mod.__call__, self._orig_mod)
            self.__dict__[_RUNNER] = runner
        return runner(*args, **kwargs)

    return __call__


_RUNNER = "_devicekit_runner"


def compile_patch(original: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compile` for a simulation: the result runs as the module docstring says."""

    @functools.wraps(original)
    def compile(model: Any = None, **options: Any) -> Any:
        if model is None:  # used as `@torch.compile(backend=...)`
            return functools.partial(compile, **options)
        compiled = original(model, **options)
        if isinstance(model, torch.nn.Module) and isinstance(compiled, torch.nn.Module):
            compiled.forward = _Runner(compiled.forward, model.__call__, model)
            return compiled
        owner = getattr(model, "__self__", None)  # `Module.compile()` compiles `_call_impl`
        module = owner if isinstance(owner, torch.nn.Module) else None
        return functools.wraps(model)(_Runner(compiled, model, module))

    return compile


class _Runner:
    """Calls compiled code off devicekit's modes, or the original code under them."""

    def __init__(
        self,
        compiled: Callable[..., Any],
        eager: Callable[..., Any],
        module: torch.nn.Module | None,
    ) -> None:
        self.compiled = compiled
        self.eager = eager
        self.module = module
        self.eager_only = False
        self.autocast: bool | None = None

    def enters_autocast(self) -> bool:
        """Whether the compiled code enters `torch.autocast` itself (compiled for the CPU, the
        region would compute in float32): its code, its module's and submodules' `forward`,
        and the functions defined in them name `autocast`."""
        if self.autocast is None:
            owners: list[object] = [self.eager]
            if self.module is not None:
                owners.extend(type(module).forward for module in self.module.modules())
            codes = [
                getattr(getattr(owner, "__func__", owner), "__code__", None) for owner in owners
            ]
            self.autocast = any(_names_autocast(code) for code in codes if code is not None)
        return self.autocast

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        session = _simulate_mode._active
        if session is None:
            return self.compiled(*args, **kwargs)
        tensors = [
            leaf for leaf in _pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)
        ]
        if self.module is not None:
            tensors.extend(self.module.parameters())
            tensors.extend(self.module.buffers())
        found, mixed = _one_device(tensors)
        if (
            mixed
            or self.eager_only
            or torch.is_autocast_enabled(session.type)
            or self.enters_autocast()
        ):
            return self.eager(*args, **kwargs)
        try:
            state.ran = True
            with _backward.modes_off():
                result = self.compiled(*args, **kwargs)
        except Exception as error:
            if not _names_a_device(error):
                raise
            self.eager_only = True
            return self.eager(*args, **kwargs)
        if found is None:
            return result
        return _pytree.tree_map_only(torch.Tensor, functools.partial(_tagged, found), result)


def _names_autocast(code: types.CodeType) -> bool:
    if "autocast" in code.co_names:
        return True
    return any(
        isinstance(const, types.CodeType) and _names_autocast(const) for const in code.co_consts
    )


def _tagged(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    _simulate_mode._set_tag(tensor, device)
    return tensor


def _one_device(tensors: list[torch.Tensor]) -> tuple[torch.device | None, bool]:
    """The simulated device all `tensors` are on (or `None`), and whether they mix devices."""
    found: torch.device | None = None
    simulated = False
    for tensor in tensors:
        device = _simulate_mode._simulated(tensor)
        if device is None:
            if tensor.dim() == 0 and tensor.device.type == "cpu":
                continue  # 0-dim CPU tensors mix with any device
            device = tensor.device
        else:
            simulated = True
        if found is None:
            found = device
        elif device != found:
            return None, True
    return (found if simulated else None), False


def _names_a_device(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if any(text in str(seen) for text in _NAMES_A_DEVICE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
