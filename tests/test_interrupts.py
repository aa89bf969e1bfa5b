"""A Ctrl-C anywhere inside entering or leaving a scoped object leaves the process consistent.

For each scoped object, a dry run counts the trace events (`call`, `line` and, with
`f_trace_opcodes`, every bytecode) of entering and leaving it, in its own frames and every frame
they call; then, for each k from 1 to that count, the block runs again with a trace function that
raises `KeyboardInterrupt` at event k. After each run:

- the block is either fully in force or not at all: if it is still in force (the interrupt landed
  after entering had finished, or before leaving had started), its own `__exit__` ends it;
- once the run's context is gone, nothing is left: no devicekit mode on torch's stack, torch's
  factories back, the holder set empty, no simulation active, guards' state gone;
- a fresh block works, and the state after it is as before.

Issue 18 item 2: an interrupt inside `default_device.__enter__` used to drive the holder count to
-1, after which `with default_device("meta"): torch.zeros(1)` landed on the CPU.
"""

from __future__ import annotations

import contextvars
import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import CodeType, FrameType
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from devicekit import (
    _context,
    _guard,
    _modes,
    _scope,
    _simulate,
    _simulate_mode,
    _transfer_guard,
    default_device,
    device_guard,
    simulated_devices,
    transfer_guard,
)
from tests.test_scope import guarded

META = torch.device("meta")
#: Under the `soak` profile every step of every object. Otherwise every step of the others, and
#: `SIMULATION_POINTS` steps of the simulation spread evenly over its entering and leaving (which
#: patch hundreds of torch attributes: some 400,000 steps), at other offsets in each setting.
SOAK = os.environ.get("DEVICEKIT_HYPOTHESIS_PROFILE") == "soak"
SIMULATION_POINTS = 60


def _transfer_refused() -> bool:
    return _transfer_guard._KIND.current() == "disallow"


# name: (make a block, whether its effect is in force here)
SCOPES: dict[str, tuple[Callable[[], AbstractContextManager[Any]], Callable[[], bool]]] = {
    "default_device": (lambda: default_device("meta"), lambda: torch.zeros(1).device == META),
    "device_guard": (device_guard, guarded),
    "transfer_guard": (transfer_guard, _transfer_refused),
    "simulated_devices": (
        lambda: simulated_devices("cuda", 2),
        lambda: torch.cuda.is_available(),
    ),
}


def _entry_points(block: object) -> set[CodeType]:
    """The code objects of `__enter__` and `__exit__` of `block`'s class."""
    kind = type(block)
    return {kind.__enter__.__code__, kind.__exit__.__code__}  # type: ignore[attr-defined]


class Injector:
    """A trace function that counts events below `targets` and raises at event `at` (0: never)."""

    def __init__(self, targets: set[CodeType], at: int) -> None:
        self.targets = targets
        self.at = at
        self.count = 0
        self.fired = False
        self.collecting = _scope.Record.__del__.__code__

    def _inside(self, frame: FrameType | None) -> bool:
        while frame is not None:
            if frame.f_code is self.collecting:
                return False  # the garbage collector's work, not entering or leaving
            if frame.f_code in self.targets:
                return True
            frame = frame.f_back
        return False

    def global_trace(self, frame: FrameType, event: str, arg: object) -> Any:
        if self.fired or event != "call" or not self._inside(frame):
            return None
        frame.f_trace_opcodes = True
        return self.local_trace(frame, event, arg)

    def local_trace(self, frame: FrameType, event: str, arg: object) -> Any:
        if self.fired:
            return None
        self.count += 1
        if self.count == self.at:
            self.fired = True
            raise KeyboardInterrupt(f"injected at event {self.at}")
        return self.local_trace


class UserMode(TorchFunctionMode):
    """A mode of the user's, pushed inside the block: leaving must keep it, once."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _run(make: Callable[[], AbstractContextManager[Any]], at: int, setting: str) -> Injector:
    """Enter and leave a block under an injector, in a context of its own.

    `setting`: `"alone"`; `"inside-another"` block of the same kind (the simulation, which
    does not nest, runs inside a `device_guard`); `"under-a-user-mode"` pushed inside the block,
    so that leaving takes devicekit's mode out from under it.
    """
    block = make()
    injector = Injector(_entry_points(block), at)
    user = UserMode()

    def trial() -> None:
        outer = None
        if setting == "inside-another":
            outer = device_guard() if isinstance(block, simulated_devices) else make()
            outer.__enter__()
        pushed = False
        sys.settrace(injector.global_trace)
        try:
            with block:
                sys.settrace(None)
                if setting == "under-a-user-mode":
                    torch._C._push_on_torch_function_stack(user)
                    pushed = True
                sys.settrace(injector.global_trace)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if pushed:
            stack = _modes._stack()
            assert [entry for entry in stack if entry is user] == [user]  # kept, once
            assert stack[-1] is user  # and still on top
            torch._C._pop_torch_function_stack()
        _check_whole(block, outer)
        if outer is not None:
            outer.__exit__(None, None, None)

    contextvars.copy_context().run(trial)
    return injector


def _check_whole(block: AbstractContextManager[Any], outer: object) -> None:
    """The block is entered entirely or not at all: if it is still there, its exit ends it."""
    if _entered(block):
        block.__exit__(None, None, None)
    assert not _entered(block)


def _entered(block: object) -> bool:
    kinds = (_context._KIND, _guard._KIND, _transfer_guard._KIND)
    session = _simulate_mode._active
    return any(_owned_by(kind.records.get(), block) for kind in kinds) or (
        session is not None and session.owner is block
    )


def _owned_by(record: _scope.Record | None, owner: object) -> bool:
    while record is not None:
        if record.owner is owner and not record.ended:
            return True
        record = record.parent
    return False


def assert_clean(*, collect: bool = True) -> None:
    if collect:
        gc.collect()
    assert _context._live == set()
    assert _context._installed == []
    assert torch.zeros is torch._C._VariableFunctions.zeros
    assert torch._C._len_torch_function_stack() == 0
    assert _simulate_mode._active is None
    assert torch.cuda.is_available() is False
    assert _guard._KIND.current() is None
    assert _transfer_guard._KIND.current() is None
    # A lock left held would make every other thread wait forever at its next block.
    assert not _context._lock._is_owned()  # type: ignore[attr-defined]
    assert not _simulate._lock._is_owned()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    assert_clean()
    yield
    assert_clean()


SETTINGS = ["alone", "inside-another", "under-a-user-mode"]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", SCOPES)
def test_an_interrupt_at_any_step_of_entering_or_leaving(name: str, setting: str) -> None:
    make, in_force = SCOPES[name]
    with make():  # warm up: lazily built tables are built outside the measured runs
        pass
    steps = _run(make, at=0, setting=setting).count
    assert steps > 20  # the trace sees the work, not just the two calls
    stride = 1
    if name == "simulated_devices" and not SOAK:
        stride = max(1, steps // SIMULATION_POINTS)
    start = 1 + SETTINGS.index(setting) * stride // len(SETTINGS)
    for at in range(start, steps + 1, stride):
        injector = _run(make, at=at, setting=setting)
        assert injector.fired or injector.count < at  # garbage collection may shorten a run
        assert_clean(collect=False)
        with make():
            assert in_force(), f"a fresh block does not work after an interrupt at step {at}"
        assert not in_force()
    assert_clean()


def test_the_reported_case_holder_count_and_meta_block() -> None:
    # The reproduction: interrupts inside __enter__, then a block must still allocate on
    # meta, and no "no attribute 'held'" from a half-made frame.
    make, _ = SCOPES["default_device"]
    steps = _run(make, at=0, setting="alone").count
    for at in range(1, steps + 1):
        _run(make, at=at, setting="alone")
        assert_clean(collect=False)
        with default_device("meta"):
            assert torch.zeros(1).device == META
    assert _context._live == set()
