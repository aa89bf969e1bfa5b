"""Every thread sees the active simulation: threads started while one is active run under it.

torch keeps its function-mode stack per thread, so the mode a simulation pushes in the thread
that entered it is not seen by a `ThreadPoolExecutor` worker, a DataLoader's pin-memory thread
or `nn.parallel.parallel_apply`'s threads. While a simulation is active, `Thread._bootstrap_inner`
(what every `threading.Thread` runs first in its new thread, subclasses included) pushes a
`_ThreadMode` for the thread's life: it hands each call to the mode of whichever simulation is
active at that moment, and lets it through untouched when none is.

The current device is kept per thread, as CUDA keeps it (`_Session.current`): a new thread starts
on device 0 and `torch.cuda.set_device` changes it for the calling thread only. Threads that were
already running when the simulation began are not reached (a thread's mode stack can only be
changed from that thread): when one asks for a simulated device, torch's C++ asks
`torch.cuda._lazy_init` for a real one, and `lazy_init` refuses with a `SimulationError` that
names the thread.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from torch.overrides import TorchFunctionMode

from devicekit import _modes, _simulate_mode
from devicekit._errors import SimulationError

__all__ = ["BELOW_THE_SIMULATION", "lazy_init", "thread_patches"]


class _ThreadMode(TorchFunctionMode):
    """The simulation's checks in a thread it did not start in: delegates to the active mode."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types_: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        __tracebackhide__ = True
        session = _simulate_mode._active
        mode = None if session is None else session.mode
        if mode is None:
            return func(*args, **(kwargs or {}))
        return mode.__torch_function__(func, types_, args, kwargs)  # type: ignore[no-untyped-call]


#: The threads started while a simulation was active: they run under it for their life.
_started: set[int] = set()


def _simulated_bootstrap(original: Callable[[threading.Thread], None]) -> Any:
    def _bootstrap_inner(self: threading.Thread) -> None:
        mode = _ThreadMode()
        _modes.push(mode)
        _started.add(threading.get_ident())
        try:
            original(self)
        finally:
            _started.discard(threading.get_ident())
            _modes.remove(mode)

    return _bootstrap_inner


#: What `SimulationError` says when torch's C++ asks for a real device from a simulated thread
#: (`_simulate_compile` recognises it: compiled code that names a device runs eagerly).
BELOW_THE_SIMULATION = "asked torch for a real"
_PACKAGE = os.path.dirname(__file__)


def lazy_init(session: _simulate_mode._Session) -> Callable[[], None]:
    """`torch.cuda._lazy_init` while `session` is active.

    torch's own Python functions call it before they touch the device: they get an answer
    from the simulation, so it does nothing for them. torch's C++ calls it when an op is about
    to make a real CUDA tensor, which only happens where the simulation's mode does not see
    the op: in a thread that was already running when the simulation began (or in compiled
    code). That is refused with a `SimulationError` that names the thread and the way out,
    instead of torch's "Torch not compiled with CUDA enabled" while `is_available()` is True.
    """

    def _lazy_init() -> None:
        caller = sys._getframe(1)
        while caller.f_back is not None and caller.f_code.co_filename.startswith(_PACKAGE):
            caller = caller.f_back  # the simulation's own wrapper of the patch
        if "_lazy_init" in caller.f_code.co_names:
            return  # a torch.cuda function of torch's own, in Python
        thread = threading.current_thread()
        spec = f"simulated_devices({session.type!r}, {session.count})"
        entered = getattr(session.users, "thread", None)
        if thread.ident in _started or thread.ident == entered:
            raise SimulationError(
                f"{caller.f_code.co_filename}:{caller.f_lineno}: code the simulation does not "
                f"see (compiled or scripted) {BELOW_THE_SIMULATION} {session.type} device; "
                f"under {spec} there is none."
            )
        raise SimulationError(
            f"Thread {thread.name!r} {BELOW_THE_SIMULATION} {session.type} device at "
            f"{caller.f_code.co_filename}:{caller.f_lineno}, but it was already running when "
            f"{spec} began, so it does not see the simulated devices (torch keeps its "
            "function modes per thread; only threads started while a simulation is active "
            "run under it). Start the thread inside the simulation, or simulate the whole run "
            f"(pytest --devicekit-simulate={session.type}:{session.count} enters it before "
            "any test starts a thread)."
        )

    return _lazy_init


def thread_patches() -> dict[tuple[object, str], object]:
    """The class attributes to replace while a simulation is active (see the module docstring)."""
    original = threading.Thread.__dict__.get("_bootstrap_inner")
    if not callable(original):  # not CPython's threading: nothing to hook, documented
        return {}
    return {(threading.Thread, "_bootstrap_inner"): _simulated_bootstrap(original)}
