"""Installing devicekit's torch function modes, one per thread, only while a guard needs it.

A guard's settings live in a context variable, so each thread and each asyncio task sees its own;
the torch function mode that enforces them lives on torch's per-thread mode stack. Every guard
entered in a thread counts towards one shared mode instance of its kind: the first pushes it, the
last to leave removes it, wherever it sits in the stack by then, so guards of asyncio tasks that
leave out of order, and the user's own modes pushed in between, never unbalance the stack.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
from torch.overrides import TorchFunctionMode
from typing_extensions import ParamSpec, Self

__all__ = ["ScopedGuard", "acquire_mode", "release_mode"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


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


class ScopedGuard(Generic[S]):
    """The scoping shared by devicekit's guards: a context manager and a sync/async decorator.

    Entering sets the guard's state in `variable` (so the thread or asyncio task that entered
    sees it, and tasks created inside) and makes sure a `mode` is on this thread's stack; leaving
    undoes both, also on an exception.
    """

    variable: ClassVar[ContextVar[Any]]
    mode: ClassVar[type[TorchFunctionMode]]

    def __init__(self) -> None:
        self._tokens: list[Token[S | None]] = []

    def _state(self) -> S:
        raise NotImplementedError

    def _enter(self) -> Token[S | None]:
        token: Token[S | None] = self.variable.set(self._state())
        acquire_mode(self.mode)
        return token

    def _exit(self, token: Token[S | None]) -> None:
        try:
            release_mode(self.mode)
        finally:
            self.variable.reset(token)

    def __enter__(self) -> Self:
        self._tokens.append(self._enter())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit(self._tokens.pop())

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Run every call of `function` (or coroutine function) inside this guard."""
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def guarded_coroutine(*args: P.args, **kwargs: P.kwargs) -> Any:
                token = self._enter()
                try:
                    return await function(*args, **kwargs)
                finally:
                    self._exit(token)

            return cast(Callable[P, R], guarded_coroutine)

        @functools.wraps(function)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            token = self._enter()
            try:
                return function(*args, **kwargs)
            finally:
                self._exit(token)

        return guarded
