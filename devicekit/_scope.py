"""Scoped objects: one implementation of "a context manager that is also a sync/async decorator".

`default_device`, `device_guard`, `transfer_guard` (through `Scoped`), `simulated_devices` and
`@colocated` (through `wrap`) share this module; what differs between them is data: the context
variable readers consult, what an entered block holds (the factory wrappers, a torch function
mode) and when it lets go.

How a block is kept: each kind has a context variable with the innermost `Record` (the chain of
entered blocks of this thread or asyncio task, innermost first) and a second one with just the
innermost block's value, for the readers on hot paths. Entering and leaving find the block by its
owner in the chain of the context that leaves it, so one object can be used by many threads and
tasks at once, and an out-of-order exit is noticed (`ScopeError`) while the state is restored.

Generators share their caller's context (Python has no per-generator context: PEP 568 was
deferred), which is what lets a `@contextmanager`, a pytest yield fixture or a pluggy hook wrapper
open a block for its caller. So a block a generator leaves open across `yield` is in force in the
caller until the generator leaves it, and its leaving is made safe wherever it happens: it ends
that block only (blocks the caller opened since stay), also when the generator is closed inside
the caller's own block, and when it is finalised in another thread the block ends in the context
that entered it too.

Interrupts: every step is one operation, or a reconciliation that is safe to run again, and a
failure while entering undoes what was done; so a `KeyboardInterrupt` landing anywhere inside
entering or leaving never leaves a count, a wrapper or a torch mode behind.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from types import FrameType, TracebackType
from typing import Any, ClassVar, Generic, TypeVar, cast

from typing_extensions import ParamSpec, Self

from devicekit._errors import InvalidArgumentError, ScopeError

__all__ = ["Kind", "Record", "Scoped", "locked", "wrap"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


class Record:
    """One entered block: its owner (the scoped object), value, and the block around it.

    `held` is what the block holds (see `Kind.hold`), `None` once let go; `frame` is the
    generator frame that entered it, if a generator did; `ended` is set when a generator's
    block ends while other contexts may still point at it, so readers skip it.
    """

    __slots__ = ("ended", "extra", "frame", "held", "kind", "owner", "parent", "value")

    def __init__(
        self,
        kind: Kind[Any],
        owner: object,
        value: Any,
        extra: Any,
        parent: Record | None,
        frame: FrameType | None,
    ) -> None:
        self.kind = kind
        self.owner = owner
        self.value: Any = value
        self.extra: Any = extra
        self.parent = parent
        self.frame = frame
        self.ended = False
        self.held: object = None

    def __del__(self) -> None:
        # `getattr`: an interrupt may have cut `__init__` short; such a record holds nothing.
        if getattr(self, "held", None) is not None and not sys.is_finalizing():
            try:
                self.kind.release(self)
            except BaseException:
                self.kind.release(self)  # an interrupt in the middle: finish letting go
                raise


def live(record: Record | None) -> Record | None:
    """`record`, or the innermost block around it that has not ended."""
    while record is not None and record.ended:
        record = record.parent
    return record


#: The blocks generators have open, by (id of the generator's frame, id of the owner).
_suspendable: dict[tuple[int, int], list[Record]] = {}


def locked(lock: Any, work: Callable[[], R]) -> R:
    """`work()` holding `lock` (an `RLock`), released even if an interrupt lands anywhere.

    `with lock:` is not enough: an exception raised between its body's last instruction and the
    call of `__exit__` (a trace function can raise there) leaves the lock held for good, and
    every other thread then waits on it forever. Here acquiring and releasing are both inside
    the `try`, and the handler releases the lock if this thread holds it.
    """
    try:
        lock.acquire()
        result = work()
        lock.release()
    except BaseException:
        if lock._is_owned():
            lock.release()
        raise
    return result


class Kind(Generic[S]):
    """What differs between kinds of scoped object, as data and two hooks.

    Args:
        name: Used in messages, e.g. `"default_device()"`.
        value: The context variable readers consult: the innermost block's value, or `None`.
        release_on_exit: Whether leaving a block lets go of what it holds (guards), or whether
            that waits until no context refers to the block any more (`default_device`, whose
            asyncio tasks keep the block they were created in).
    """

    def __init__(self, name: str, value: ContextVar[S | None], *, release_on_exit: bool) -> None:
        self.name = name
        self.value = value
        self.records: ContextVar[Record | None] = ContextVar(f"{value.name}_records", default=None)
        self.release_on_exit = release_on_exit

    # --- what a block holds: overridden per kind ------------------------------------------------

    def hold(self, record: Record) -> None:
        """Take what the block needs. Must set `record.held` before changing anything."""

    def release(self, record: Record) -> None:
        """Let go of what `record` holds; safe to call twice, or after a `hold` cut short."""
        record.held = None

    # --- reading ----------------------------------------------------------------------------------

    def current(self) -> S | None:
        """The innermost active block's value in this context, or `None`."""
        value = self.value.get()
        if value is None:
            return None
        record = self.records.get()
        if record is None or not record.ended:
            return value
        record = live(record)
        return None if record is None else cast(S, record.value)

    def innermost(self) -> Record | None:
        """The innermost active block in this context."""
        return live(self.records.get())

    # --- entering and leaving ---------------------------------------------------------------------

    def enter(self, owner: object, value: S | None, frame: FrameType, extra: object = None) -> None:
        """Open a block of `owner` in this context; `frame` is the code that entered it."""
        generator = frame if frame.f_code.co_flags & _GENERATOR_FLAGS else None
        parent = self.records.get()
        previous = self.value.get()
        record = Record(self, owner, value, extra, parent, generator)
        try:
            self.hold(record)
            if generator is not None:
                _suspendable.setdefault((id(generator), id(owner)), []).append(record)
            self.records.set(record)
            self.value.set(value)
        except BaseException:
            self.records.set(parent)
            self.value.set(previous)
            self._forget(record)
            self.release(record)
            raise

    def exit(self, owner: object, frame: FrameType, failing: bool) -> None:
        """Close the innermost block of `owner` in this context.

        Raises:
            ScopeError: The block is not active in this context, or blocks entered after it in
                the same context are still open (they are ended with it: the state before the
                block is restored). Not raised for the latter while an exception propagates.
        """
        if frame.f_code.co_flags & _GENERATOR_FLAGS:
            entries = _suspendable.get((id(frame), id(owner)))
            if entries:
                self._exit_generator(entries[-1])
                return
        top = self.records.get()
        record, above = top, []
        while record is not None and (record.owner is not owner or record.ended):
            if not record.ended:
                above.append(record)
            record = record.parent
        if record is None:
            raise ScopeError(
                f"{self.name}: this block is not active in the current thread or asyncio task, "
                "so it cannot be exited here. Enter and exit a block in the same thread and "
                "task (a `with` statement always does)."
            )
        parent = live(record.parent)
        try:
            self.records.set(parent)
            self.value.set(None if parent is None else parent.value)
        finally:
            for ended in (*above, record):
                if ended.frame is not None:
                    ended.ended = True  # a generator's block: ended everywhere
                if self.release_on_exit or ended.frame is not None:
                    self.release(ended)
        strays = [entry for entry in above if entry.frame is None]
        if strays and not failing:
            names = ", ".join(repr(entry.owner) for entry in strays)
            raise ScopeError(
                f"{self.name}: exited while blocks entered after it in this thread or task were "
                f"still open ({names}); they are ended too, and the state from before this block "
                "is restored. Exit blocks in the reverse order of entering them (nested `with` "
                "statements always do)."
            )

    def _exit_generator(self, record: Record) -> None:
        """A generator leaves its block: end it everywhere, keeping the caller's later blocks."""
        try:
            if not record.ended and live(self.records.get()) is record:
                parent = live(record.parent)
                self.records.set(parent)
                self.value.set(None if parent is None else parent.value)
        finally:
            record.ended = True
            self._forget(record)
            self.release(record)

    def _forget(self, record: Record) -> None:
        if record.frame is None:
            return
        key = (id(record.frame), id(record.owner))
        entries = _suspendable.get(key, [])
        if record in entries:
            entries.remove(record)
        if not entries:
            _suspendable.pop(key, None)


class Scoped(Generic[S]):
    """Base of the scoped objects kept per context: a context manager and a sync/async decorator.

    Subclasses set `kind` and return their block's value from `_value`.
    """

    kind: ClassVar[Kind[Any]]
    __slots__ = ()

    def _value(self) -> S:
        raise NotImplementedError

    def _extra(self) -> object:
        return None

    def __enter__(self) -> Self:
        self.kind.enter(self, self._value(), sys._getframe(1), self._extra())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kind.exit(self, sys._getframe(1), exc_type is not None)

    def __call__(self, function: Callable[P, R]) -> Callable[P, R]:
        """Run every call of `function` (plain or `async`) inside this block."""
        return wrap(function, lambda: self, generators=f"{self!r}")


def wrap(
    function: Callable[P, R],
    around: Callable[[], AbstractContextManager[object]] = nullcontext,
    *,
    arguments: Callable[[tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]]
    | None = None,
    generators: str | None = None,
) -> Callable[P, R]:
    """`function` (plain or `async`) with each call run inside `around()`, its arguments first
    passed through `arguments`.

    Args:
        function: What to wrap.
        around: Makes the context manager each call runs in (none by default).
        arguments: Turns the call's `(args, kwargs)` into the ones `function` gets.
        generators: The decorator's name, to refuse generator functions with; `None` to wrap
            them as plain functions (what `around` covers is then only the call that makes the
            generator).

    Raises:
        InvalidArgumentError: `function` is a generator function and `generators` is set.
    """
    if generators is not None and (
        inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function)
    ):
        raise InvalidArgumentError(
            f"{generators} cannot decorate the generator function "
            f"{getattr(function, '__qualname__', function)!r}: its body runs between the "
            "caller's own steps, so the block would stay open in the caller while it is "
            "suspended. Open the block inside the generator, around the work of each step, or "
            "decorate the function that consumes it."
        )
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            call_args, call_kwargs = (
                (args, kwargs) if arguments is None else arguments(args, kwargs)
            )
            with around():
                return await function(*call_args, **call_kwargs)

        return cast(Callable[P, R], run_async)

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        call_args, call_kwargs = (args, kwargs) if arguments is None else arguments(args, kwargs)
        with around():
            return function(*call_args, **call_kwargs)

    return run
