"""Installing devicekit's torch function modes, one per thread, only while a guard needs it.

A guard's settings live in a context variable, so each thread and each asyncio task sees its own;
the torch function mode that enforces them lives on torch's per-thread mode stack. Every guard
entered in a thread counts towards one shared mode instance of its kind: the first pushes it, the
last to leave removes it, wherever it sits in the stack by then, so guards of asyncio tasks that
leave out of order, and the user's own modes pushed in between, never unbalance the stack.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["acquire_mode", "release_mode"]


class _Installed(threading.local):
    def __init__(self) -> None:
        self.modes: dict[type[TorchFunctionMode], tuple[TorchFunctionMode, int]] = {}


_installed = _Installed()


def acquire_mode(kind: type[TorchFunctionMode]) -> None:
    """Make sure a mode of `kind` is on this thread's stack, counting one more user of it."""
    mode, users = _installed.modes.get(kind, (None, 0))
    if mode is None:
        mode = kind()
        torch._C._push_on_torch_function_stack(mode)
    _installed.modes[kind] = (mode, users + 1)


def release_mode(kind: type[TorchFunctionMode]) -> None:
    """Count one user of the `kind` mode less; the last one takes it off this thread's stack."""
    mode, users = _installed.modes[kind]
    if users > 1:
        _installed.modes[kind] = (mode, users - 1)
        return
    del _installed.modes[kind]
    above: list[object] = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
