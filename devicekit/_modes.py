"""devicekit's torch function modes on torch's per-thread mode stack, only while they are needed.

A guard's settings live in a context variable, so each thread and each asyncio task sees its own;
the torch function mode that enforces them lives on torch's per-thread mode stack. Each thread
keeps one mode instance per kind, and the set of entered blocks that use it: the first user
pushes it, and when the last one leaves it is taken out of the stack wherever it sits by then,
so guards of asyncio tasks that leave out of order, and the user's own modes pushed in between,
never unbalance the stack.

Every change is made so that an exception landing between any two bytecodes (a Ctrl-C) leaves
nothing half done: the users are a set, changed by one operation, and the stack is then brought
in line with them by `_sync`, which is safe to run again after an interruption.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TypeVar, cast

import torch
from torch.overrides import TorchFunctionMode

from devicekit._scope import Kind, Record

__all__ = ["ModeKind", "Users", "push", "remove", "users"]

S = TypeVar("S")

_push = torch._C._push_on_torch_function_stack
_pop = torch._C._pop_torch_function_stack
_size = torch._C._len_torch_function_stack
_at = torch._C._get_function_stack_at


# No generator expressions here: one left suspended (by `any`) is closed by the garbage
# collector later, where an interrupt can only be printed, not handled.


def _stack() -> list[object]:
    return [_at(index) for index in range(_size())]


def _contains(stack: Sequence[object], mode: object) -> bool:
    for entry in stack:  # noqa: SIM110 - no generator expression (see above)
        if entry is mode:
            return True
    return False


def _starts(desired: Sequence[object], stack: Sequence[object]) -> bool:
    """Whether `stack` is the start of `desired`, entry by entry (by identity)."""
    if len(stack) > len(desired):
        return False
    for index in range(len(stack)):  # noqa: SIM110 - no generator expression (see above)
        if stack[index] is not desired[index]:
            return False
    return True


def _rebuild(desired: Sequence[object]) -> None:
    """Make this thread's mode stack exactly `desired`, popping and pushing as little as needed.

    Idempotent: interrupted anywhere, running it again finishes the job.
    """
    while not _starts(desired, _stack()):
        _pop()
    for mode in desired[_size() :]:
        _push(mode)


def push(mode: TorchFunctionMode) -> None:
    """Put `mode` on top of this thread's stack (one call: nothing to undo if interrupted)."""
    _push(mode)


def remove(mode: object) -> None:
    """Take `mode` out of this thread's stack wherever it is, keeping the modes above it."""
    stack = _stack()
    if not _contains(stack, mode):
        return
    desired = [entry for entry in stack if entry is not mode]
    try:
        _rebuild(desired)
    except BaseException:
        _rebuild(desired)
        raise


class Users:
    """This thread's devicekit modes: one instance per kind, and who uses each.

    `retired` are modes that another thread asked to take off this thread's stack (a block
    finalised there); a thread cannot touch another's stack, so this one does it at its next
    change. They are inert meanwhile: their state is gone from every context.
    """

    def __init__(self) -> None:
        self.modes: dict[type[TorchFunctionMode], TorchFunctionMode] = {}
        self.users: dict[type[TorchFunctionMode], set[int]] = {}
        self.retired: list[object] = []
        self.thread = threading.get_ident()

    def acquire(self, kind: type[TorchFunctionMode], user: int) -> None:
        """Count `user` (an id) as a user of the `kind` mode, pushing it if it is not there."""
        self.users.setdefault(kind, set()).add(user)
        self.sync(kind)

    def release(self, kind: type[TorchFunctionMode], user: int) -> None:
        """Forget `user`; the mode leaves the stack with its last user (later, from elsewhere)."""
        self.users.get(kind, set()).discard(user)
        if threading.get_ident() == self.thread:
            self.sync(kind)
        else:
            mode = self.modes.get(kind)
            if mode is not None and not self.users.get(kind):
                self.retired.append(mode)

    def acquire_instance(self, mode: TorchFunctionMode) -> None:
        """Push `mode`, a mode of one block's own (a simulation's), on this thread's stack."""
        self.tidy()
        push(mode)

    def release_instance(self, mode: TorchFunctionMode) -> None:
        """Take `mode` off its thread's stack: now from that thread, else at its next change."""
        if threading.get_ident() == self.thread:
            remove(mode)
        else:
            self.retired.append(mode)

    def tidy(self) -> None:
        """Take off this thread's stack the modes other threads retired (only from this thread)."""
        while self.retired:
            retired = self.retired[-1]
            if not self.users.get(cast(type[TorchFunctionMode], type(retired))):
                remove(retired)
            self.retired.pop()

    def sync(self, kind: type[TorchFunctionMode]) -> None:
        """Bring this thread's stack in line with the users (only from this thread)."""
        self.tidy()
        mode = self.modes.get(kind)
        if mode is None:
            mode = self.modes.setdefault(kind, kind())
        present = _contains(_stack(), mode)
        if self.users.get(kind):
            if not present:
                push(mode)
        elif present:
            remove(mode)


_local = threading.local()


def users() -> Users:
    """The calling thread's `Users` (a plain object: other threads may hold it and release)."""
    found: Users | None = getattr(_local, "users", None)
    if found is None:
        found = _local.users = Users()
    return found


class ModeKind(Kind[S]):
    """Scoped objects whose blocks need a torch function mode (the guards): each block is one
    user of its thread's `mode` instance, from entering until leaving."""

    def __init__(self, name: str, value: ContextVar[S | None], mode: type[TorchFunctionMode]):
        super().__init__(name, value, release_on_exit=True)
        self.mode = mode

    def hold(self, record: Record) -> None:
        holder = record.held = users()
        holder.acquire(self.mode, id(record))

    def release(self, record: Record) -> None:
        holder = record.held
        if isinstance(holder, Users):
            holder.release(self.mode, id(record))
        record.held = None
