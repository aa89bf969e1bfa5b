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
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from types import FrameType
from typing import Any, TypeVar

import torch
from typing_extensions import ParamSpec

from devicekit._resolve import best_device, resolve
from devicekit._scope import Kind, Record, Scoped, live, locked
from devicekit._types import DeviceLike

__all__ = ["as_device", "carry_default_device", "current_device", "default_device"]

P = ParamSpec("P")
R = TypeVar("R")

#: The innermost active `default_device` of this thread or asyncio task (`None`: none active).
_ACTIVE: ContextVar[torch.device | None] = ContextVar("devicekit_default_device", default=None)


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
    device = _block_device()
    if device is None:
        return best_device()  # chosen once per configuration, cached by `_resolve`
    if _active_device() is None:  # torch's default was changed inside the block: it wins
        return torch.get_default_device()
    return device


def as_device(spec: DeviceLike = None, *, check: bool = True) -> torch.device:
    """Turn anything a user writes for a device into one normalised `torch.device`.

    Accelerator devices always come back indexed (`"cuda"` means the current CUDA device, so
    `as_device("cuda") == as_device("cuda:0")` on a fresh process), and `cpu`/`meta` never
    carry an index, matching the `.device` of tensors that live there.

    Args:
        spec: `"auto"` (see `best_device`), `"cpu"`, `"meta"`, `"cuda"`,
            `"cuda:1"`, `"gpu"`/`"accelerator"` (this machine's accelerator type),
            an `int` accelerator index, a `torch.device`, or `None` for the current
            default device (see `devicekit.current_device`).
        check: Verify that the device exists on this machine.

    Raises:
        InvalidDeviceSpecError: The spec is malformed (`"cuda:x"`, `"cuda:-1"`, `3.5`).
        DeviceUnavailableError: The spec is well-formed but the device is not there
            (`"cuda:7"` on a one-GPU machine), and `check` is true.

    Example:
        >>> import devicekit
        >>> devicekit.as_device("cpu:0"), devicekit.as_device("meta")
        (device(type='cpu'), device(type='meta'))
    """
    # `None` is this module's to answer; every other spec goes to the one resolver.
    return current_device() if spec is None else resolve(spec, operation="as_device", check=check)


# --- blocks -------------------------------------------------------------------------------------


class _DefaultDeviceKind(Kind[torch.device]):
    """`default_device` blocks hold the factory wrappers, until no context refers to them.

    A block's `extra` is the tuple of torch's own default-device modes (`with torch.device(...)`,
    `torch.set_default_device`) in force or displaced when it was entered: older than the
    block, they never override it. Any other one is newer: the user changed torch's default
    inside the block, and torch's setting wins until it is undone.
    """

    def hold(self, record: Record) -> None:
        if record.value is None:  # `carry_default_device` of no block: nothing to hold
            return
        record.held = True
        _hold(record)

    def release(self, record: Record) -> None:
        if record.held is not None:
            _release(record)
            record.held = None


_KIND = _DefaultDeviceKind("default_device()", _ACTIVE, release_on_exit=False)
_FRAME = _KIND.records


def _block_device() -> torch.device | None:
    """The device of the innermost active `default_device` block here, torch's settings aside."""
    return _KIND.current()


def _enter(device: torch.device | None, owner: object, frame: FrameType) -> None:
    _KIND.enter(owner, device, frame, _torch_device_modes())


def _exit(owner: object, frame: FrameType, failing: bool = False) -> None:
    _KIND.exit(owner, frame, failing)


class default_device(Scoped[torch.device]):
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
    restored however the block is left, a `KeyboardInterrupt` included. A generator shares its
    caller's context, so a block it holds open across `yield` is in force in the caller until
    the generator leaves it (what a `@contextmanager` relies on); however and wherever the
    generator is closed, that ends its block only. `torch.set_default_device` or
    `with torch.device(...)` used inside a block take precedence until they are undone; used
    around it, the block wins.

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

    kind = _KIND
    __slots__ = ("device",)

    def __init__(self, spec: DeviceLike) -> None:
        self.device: torch.device = (
            current_device() if spec is None else resolve(spec, operation="default_device")
        )

    def __repr__(self) -> str:
        return f"devicekit.default_device({str(self.device)!r})"

    def _value(self) -> torch.device:
        return self.device

    def _extra(self) -> object:
        return _torch_device_modes()

    def __enter__(self) -> torch.device:  # type: ignore[override]
        _KIND.enter(self, self.device, sys._getframe(1), _torch_device_modes())
        return self.device


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
    device = _block_device()

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        owner = object()
        frame = sys._getframe()
        _enter(device, owner, frame)
        try:
            return function(*args, **kwargs)
        finally:
            _exit(owner, frame)

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
    if frame is None:
        return device
    if frame.ended:  # a generator's block, ended from another thread
        frame = live(frame)
        if frame is None:
            return None
        device = frame.value
    if not _torch_function_stack_size():
        return device  # the common case, decided without looking at torch's mode stack
    mode = _torch_device_mode()
    if mode is None or any(mode is older for older in frame.extra):
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
#: The ids of the blocks that hold the wrappers in place (a set: adding and removing one is a
#: single step, and doing it twice is harmless).
_live: set[int] = set()
#: The swaps made, while installed.
_installed: list[_Swap] = []
#: Wrappers already built, by the id of the function they wrap (kept alive by `_wrapped`),
#: and the other way round.
_wrappers: dict[int, Callable[..., Any]] = {}
_unwrapped: dict[int, Callable[..., Any]] = {}
_wrapped: list[object] = []
_primed = False


def _hold(record: object) -> None:
    locked(_lock, functools.partial(_change, _live.add, id(record)))


def _release(record: object) -> None:
    locked(_lock, functools.partial(_change, _live.discard, id(record)))


def _change(change: Callable[[int], None], key: int) -> None:
    change(key)
    _sync()


def _sync() -> None:
    """Wrappers in place exactly while a block is alive; safe to run again if interrupted."""
    try:
        if _live:
            if not _complete:
                _install()
        elif _installed:
            _uninstall()
    except BaseException:
        if _live:
            _install()
        else:
            _uninstall()
        raise


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


#: Whether every swap in `_installed` is in place.
_complete = False


def _install() -> None:
    global _complete
    _prime_torch_caches()
    swaps = _plan()
    _installed[:] = swaps  # first, so that an interrupted install is undone by `_uninstall`
    for swap in swaps:
        swap.namespace.update(swap.wrappers)
    _complete = True


def _uninstall() -> None:
    global _complete
    _complete = False
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
