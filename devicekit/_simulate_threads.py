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
changed from that thread); the docs say so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from torch.overrides import TorchFunctionMode

from devicekit import _modes, _simulate_mode

__all__ = ["thread_patches"]


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


def _simulated_bootstrap(original: Callable[[threading.Thread], None]) -> Any:
    def _bootstrap_inner(self: threading.Thread) -> None:
        mode = _ThreadMode()
        _modes.push(mode)
        try:
            original(self)
        finally:
            _modes.remove(mode)

    return _bootstrap_inner


def thread_patches() -> dict[tuple[object, str], object]:
    """The class attributes to replace while a simulation is active (see the module docstring)."""
    original = threading.Thread.__dict__.get("_bootstrap_inner")
    if not callable(original):  # not CPython's threading: nothing to hook, documented
        return {}
    return {(threading.Thread, "_bootstrap_inner"): _simulated_bootstrap(original)}
