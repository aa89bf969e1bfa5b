"""The default device: `default_device()` blocks and `current_device()`.

How it works, and why not with a torch function mode: `with torch.device(...)` pushes a
`TorchFunctionMode`, and while any mode is on the stack every torch call (an `add`, a `Linear`
forward) takes a detour through Python, about 1.5 us each. devicekit instead swaps the factory
functions (`torch.zeros`, `torch.empty`, ...) for thin wrappers while at least one block is
alive anywhere in the process. A wrapper reads the `_ACTIVE` context variable at call time, so
threads and asyncio tasks each see their own innermost block; every other torch call runs
untouched. When the last block is gone the original functions are put back.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TypeVar, cast

import torch
from typing_extensions import ParamSpec

from devicekit._discovery import ENV_DEVICE, _as_device, accelerator_type, best_device
from devicekit._errors import InvalidArgumentError, ScopeError
from devicekit._types import DeviceLike

__all__ = ["carry_default_device", "current_device", "default_device"]

P = ParamSpec("P")
R = TypeVar("R")

#: The innermost active `default_device` of this thread or asyncio task (`None`: none active).
_ACTIVE: ContextVar[torch.device | None] = ContextVar("devicekit_default_device", default=None)

# "auto" is resolved once per configuration, so that consecutive batches of one process never
# land on different accelerators because free memory changed in between.
_auto_cache: dict[tuple[str | None, str | None, str | None], torch.device] = {}


def _auto_device() -> torch.device:
    key = (os.environ.get(ENV_DEVICE), os.environ.get("LOCAL_RANK"), accelerator_type())
    device = _auto_cache.get(key)
    if device is None:
        device = _auto_cache[key] = best_device()
    return device


def current_device() -> torch.device:
    """The device devicekit uses when none is given.

    The innermost active `default_device` block of this thread or asyncio task (or torch's
    default device, if `torch.set_default_device` or `with torch.device(...)` changed it
    inside that block), else the `DEVICEKIT_DEVICE` environment variable, else
    `devicekit.best_device` (resolved once per process and configuration, so it does not
    change between training steps).

    Example:
        >>> import devicekit
        >>> devicekit.current_device().type in ("cpu", "cuda", "mps", "xpu")
        True
    """
    device = _ACTIVE.get()
    if device is None:
        return _auto_device()
    if _active_device() is None:  # torch's default was changed inside the block: it wins
        return torch.get_default_device()
    return device


# --- blocks -------------------------------------------------------------------------------------


class _Frame:
    """One entered block, as seen by the context it was entered in (and the tasks it spawns).

    `torch_modes` are torch's own default-device modes (`with torch.device(...)`,
    `torch.set_default_device`) in force or displaced when the block was entered: older than
    the block, they never override it. Any other one is newer: the user changed torch's default
    inside the block, and torch's setting wins until it is undone. While a frame is alive
    (referenced by any context), the factory wrappers stay installed.
    """

    __slots__ = ("device", "held", "owner", "parent", "previous", "torch_modes")

    def __init__(self, device: torch.device | None, owner: object, parent: _Frame | None) -> None:
        self.device = device
        self.owner = owner
        self.parent = parent
        self.previous = _ACTIVE.get()
        self.torch_modes = _torch_device_modes()
        self.held = device is not None
        if self.held:
            _hold()

    def __del__(self) -> None:
        if self.held and not sys.is_finalizing():
            self.held = False
            _release()


_FRAME: ContextVar[_Frame | None] = ContextVar("devicekit_default_device_frame", default=None)


def _enter(device: torch.device | None, owner: object) -> None:
    frame = _Frame(device, owner, _FRAME.get())
    _FRAME.set(frame)
    _ACTIVE.set(device)


def _exit(owner: object) -> None:
    frame = _FRAME.get()
    while frame is not None and frame.owner is not owner:
        frame = frame.parent
    if frame is None:
        raise ScopeError(
            "default_device(): this block is not active in the current thread or asyncio task, "
            "so it cannot be exited here. Enter and exit a block in the same thread and task "
            "(a `with` statement always does)."
        )
    # Exiting an outer block also ends any block entered inside it and left open.
    _FRAME.set(frame.parent)
    _ACTIVE.set(frame.previous)


class default_device:
    """Make `spec` the default device inside a block or a decorated function.

    Inside the block, `devicekit.current_device()` and `torch.get_default_device()` return the
    device, and torch factory functions called without `device=` (`torch.zeros`, `torch.empty`,
    `torch.tensor`, `torch.arange`, `torch.rand*`, ... and so the parameters and buffers of
    `nn.Module`s built there) allocate on it. An explicit `device=` always wins, and the
    `*_like` functions follow their input, as in torch.

    The setting is scoped like a `contextvars.ContextVar`: it is seen by the code in the block,
    by asyncio tasks created inside it (they keep the device they were created with), and by
    nothing else. Other threads never see it; use `devicekit.carry_default_device` to take it
    into a worker thread. Blocks nest (the innermost wins) and one `default_device` object may
    be entered again while active, from several threads or tasks at once. The previous state is
    restored however the block is left. `torch.set_default_device` or `with torch.device(...)`
    used inside a block take precedence until they are undone; used around it, the block wins.

    Outside any block devicekit adds nothing to torch calls. Inside, only the factory functions
    cost a little more (far less than under `with torch.device(...)`).

    Args:
        spec: Any device spelling `devicekit.as_device` accepts. It is validated here, so an
            unknown or missing device fails at the `with` line, not at the first allocation.

    Raises:
        InvalidDeviceSpecError: `spec` is malformed.
        DeviceUnavailableError: `spec` names a device this machine does not have.

    Example:
        >>> import torch, devicekit
        >>> with devicekit.default_device("meta"):
        ...     torch.zeros(2).device, torch.nn.Linear(2, 2).weight.device
        (device(type='meta'), device(type='meta'))
        >>> torch.zeros(2).device
        device(type='cpu')
    """

    __slots__ = ("device",)

    def __init__(self, spec: DeviceLike) -> None:
        self.device: torch.device = _as_device(spec, check=True, operation="default_device")

    def __repr__(self) -> str:
        return f"devicekit.default_device({str(self.device)!r})"

    def __enter__(self) -> torch.device:
        _enter(self.device, self)
        return self.device

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _exit(self)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Run every call of `function` (plain or `async`) inside this block."""
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            raise InvalidArgumentError(
                f"default_device({str(self.device)!r}) cannot decorate the generator function "
                f"{function.__qualname__}: its body runs between the caller's own steps, so the "
                "block would leak into the caller. Use `with devicekit.default_device(...):` "
                "inside the generator, or decorate the function that consumes it."
            )
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self:
                    return await function(*args, **kwargs)

            return cast(Callable[P, R], run_async)

        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with self:
                return function(*args, **kwargs)

        return run


def carry_default_device(function: Callable[P, R]) -> Callable[P, R]:
    """Wrap `function` so that it runs under the default device active here and now.

    Threads do not inherit `default_device` blocks (each thread starts with none), and
    neither do `concurrent.futures` workers or `loop.run_in_executor`. Wrap the function
    where the block is active and hand the wrapper to the thread or executor; whichever thread
    calls it then runs it inside the same default device (or inside none, if none was active).
    `asyncio.to_thread` and asyncio tasks carry the block on their own.

    Example:
        >>> import torch, devicekit
        >>> from concurrent.futures import ThreadPoolExecutor
        >>> with devicekit.default_device("meta"), ThreadPoolExecutor(1) as pool:
        ...     pool.submit(devicekit.carry_default_device(torch.zeros), 2).result().device
        device(type='meta')
    """
    device = _ACTIVE.get()

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        owner = object()
        _enter(device, owner)
        try:
            return function(*args, **kwargs)
        finally:
            _exit(owner)

    return run


# --- torch's own default device -----------------------------------------------------------------


_torch_function_stack_size = torch._C._len_torch_function_stack


def _torch_device_mode() -> object | None:
    """torch's innermost default-device mode on this thread's function-mode stack, if any."""
    size = _torch_function_stack_size()
    if not size:
        return None
    module = sys.modules.get("torch.utils._device")
    if module is None:  # torch imports it on the first use of its default device
        return None
    device_context: type = module.DeviceContext
    for index in range(size - 1, -1, -1):
        mode: object = torch._C._get_function_stack_at(index)
        if isinstance(mode, device_context):
            return mode
    return None


def _torch_device_modes() -> tuple[object, ...]:
    """Every torch default-device mode on this thread's stack, and those they displaced."""
    size = _torch_function_stack_size()
    module = sys.modules.get("torch.utils._device")
    if not size or module is None:
        return ()
    device_context: type = module.DeviceContext
    modes: list[object] = []
    for index in range(size):
        mode: object = torch._C._get_function_stack_at(index)
        # `torch.set_default_device` takes the previous one off the stack and keeps it here.
        while isinstance(mode, device_context):
            modes.append(mode)
            mode = getattr(mode, "prev_mode", None)
    return tuple(modes)


def _active_device() -> torch.device | None:
    """The device a factory call here should default to, or `None` to leave it to torch."""
    device = _ACTIVE.get()
    if device is None:
        return None
    frame = _FRAME.get()
    if frame is None or not _torch_function_stack_size():
        return device  # the common case, decided without looking at torch's mode stack
    mode = _torch_device_mode()
    if mode is None or any(mode is older for older in frame.torch_modes):
        return device
    return None  # torch's default was changed inside the block: the newer setting wins


# TorchDynamo cannot trace a context variable: it calls this function while compiling and
# writes the device it returns into the graph (what `torch.compiler.assume_constant_result`
# does, without importing the compiler).
_active_device._dynamo_marked_constant = True  # type: ignore[attr-defined]


# --- the factory wrappers -----------------------------------------------------------------------

# Functions that allocate a new tensor from scratch and take `device=`: the ones torch's own
# default device covers (torch/utils/_device.py), by the module that exposes them.
_FACTORIES: dict[str, tuple[str, ...]] = {
    "torch": (
        "arange",
        "as_tensor",
        "asarray",
        "bartlett_window",
        "blackman_window",
        "empty",
        "empty_permuted",
        "empty_quantized",
        "empty_strided",
        "eye",
        "full",
        "hamming_window",
        "hann_window",
        "kaiser_window",
        "linspace",
        "logspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "range",
        "scalar_tensor",
        "sparse_bsc_tensor",
        "sparse_bsr_tensor",
        "sparse_compressed_tensor",
        "sparse_coo_tensor",
        "sparse_csc_tensor",
        "sparse_csr_tensor",
        "tensor",
        "tril_indices",
        "triu_indices",
        "zeros",
    ),
    "torch.fft": ("fftfreq", "rfftfreq"),
    "torch.nested": ("nested_tensor",),
}


def _factory(original: Callable[..., Any]) -> Callable[..., Any]:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device") is None and kwargs.get("out") is None:
            device = _active_device()
            if device is not None:
                kwargs["device"] = device
        return original(*args, **kwargs)

    return _dressed(factory, original)


def _normal(original: Callable[..., Any]) -> Callable[..., Any]:
    # torch.normal(mean, std, size) allocates; its overloads with tensor arguments follow them
    # and reject `device=`, which is why torch's own default device leaves it out.
    def normal(*args: Any, **kwargs: Any) -> Any:
        if (
            kwargs.get("device") is None
            and kwargs.get("out") is None
            and not any(isinstance(arg, torch.Tensor) for arg in (*args, *kwargs.values()))
        ):
            device = _active_device()
            if device is not None:
                kwargs["device"] = device
        return original(*args, **kwargs)

    return _dressed(normal, original)


def _get_default_device(original: Callable[[], torch.device]) -> Callable[[], torch.device]:
    def get_default_device() -> torch.device:
        device = _active_device()
        return original() if device is None else device

    return _dressed(get_default_device, original)


def _dressed(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    functools.update_wrapper(wrapper, original)
    return wrapper


_lock = threading.RLock()
_holders = 0
#: The swaps made, while installed.
_installed: list[_Swap] = []
#: Wrappers already built, by the id of the function they wrap (kept alive by `_wrapped`),
#: and the other way round.
_wrappers: dict[int, Callable[..., Any]] = {}
_unwrapped: dict[int, Callable[..., Any]] = {}
_wrapped: list[object] = []
_primed = False


def _hold() -> None:
    global _holders
    with _lock:
        _holders += 1
        if _holders == 1:
            _install()


def _release() -> None:
    global _holders
    with _lock:
        _holders -= 1
        if _holders == 0:
            _uninstall()


def _prime_torch_caches() -> None:
    """Fill torch's lazily built tables of its functions before any name points at a wrapper."""
    global _primed
    if _primed:
        return
    import torch.utils._device

    torch.utils._device._device_constructors()
    torch.overrides.get_ignored_functions()
    torch.overrides.get_overridable_functions()
    _primed = True


_Make = Callable[[Callable[..., Any]], Callable[..., Any]]


@functools.lru_cache(maxsize=1)
def _targets() -> tuple[tuple[dict[str, Any], str, _Make], ...]:
    """(module namespace, name, wrapper factory) of every function to replace."""
    targets: list[tuple[dict[str, Any], str, _Make]] = []
    for module_name, names in _FACTORIES.items():
        namespace = vars(importlib.import_module(module_name))
        targets += [(namespace, name, _factory) for name in names if name in namespace]
    targets.append((vars(torch), "normal", _normal))
    targets.append((vars(torch), "get_default_device", _get_default_device))
    return tuple(targets)


class _Swap:
    """The replacements for one module: wrappers in, originals back, each in one dict update."""

    __slots__ = ("namespace", "originals", "wrappers")

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace
        self.originals: dict[str, Any] = {}
        self.wrappers: dict[str, Any] = {}

    def holds(self, functions: dict[str, Any]) -> bool:
        """Whether the module holds exactly these functions under these names."""
        # Functions compare by identity; map and list comparison keep the loop in C.
        return list(map(self.namespace.get, functions)) == list(functions.values())

    def restore(self) -> None:
        if self.holds(self.wrappers):
            self.namespace.update(self.originals)
            return
        for name, wrapper in self.wrappers.items():
            # Leave the name alone if someone else replaced our wrapper in the meantime.
            if self.namespace.get(name) is wrapper:
                self.namespace[name] = self.originals[name]


_swaps: list[_Swap] = []


def _plan() -> list[_Swap]:
    """The swaps for the functions the modules hold now, reusing wrappers already made."""
    if _swaps and all([swap.holds(swap.originals) for swap in _swaps]):
        return _swaps
    swaps: dict[int, _Swap] = {}
    for namespace, name, make in _targets():
        swap = swaps.setdefault(id(namespace), _Swap(namespace))
        original = namespace[name]
        # A wrapper of ours left behind (someone's patch saved it and put it back after the
        # last block): wrap what it wraps, so that the end of the next block cleans it up.
        original = _unwrapped.get(id(original), original)
        wrapper = _wrappers.get(id(original))
        if wrapper is None:
            wrapper = _wrappers[id(original)] = make(original)
            _unwrapped[id(wrapper)] = original
            _wrapped.append(original)
        swap.originals[name] = original
        swap.wrappers[name] = wrapper
    _swaps[:] = swaps.values()
    return _swaps


def _install() -> None:
    _prime_torch_caches()
    for swap in _plan():
        swap.namespace.update(swap.wrappers)
        _installed.append(swap)


def _uninstall() -> None:
    for swap in _installed:
        swap.restore()
    _forget_wrappers_in_dynamo()
    _installed.clear()


def _forget_wrappers_in_dynamo() -> None:
    """Drop TorchDynamo's table of torch functions if it was built while wrappers were in place.

    The table is built on first use by looking the functions up by name; built inside a block,
    it would hold the wrappers instead of torch's built-ins, and `torch.compile` would no longer
    recognise `torch.zeros` once the block is over. Dropped, it is rebuilt on next use.
    """
    trace_rules = sys.modules.get("torch._dynamo.trace_rules")
    table = getattr(trace_rules, "get_torch_obj_rule_map", None)
    if table is None or not table.cache_info().currsize:
        return
    if any(wrapper in table() for swap in _installed for wrapper in swap.wrappers.values()):
        table.cache_clear()
