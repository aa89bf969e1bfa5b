"""The scoped objects together: decorators, objects shared by threads and tasks, out-of-order
exits, generators, and the simulation's start and end (issues 12 and 18)."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
import torch

import devicekit
from devicekit import (
    CrossDeviceError,
    ScopeError,
    TransferGuardError,
    _context,
    _guard,
    _simulate_mode,
    _transfer_guard,
    default_device,
    device_guard,
    simulated_devices,
    transfer_guard,
)

CPU, META = torch.device("cpu"), torch.device("meta")


def assert_clean() -> None:
    """Nothing of devicekit left anywhere: no block, no wrapper, no mode, no simulation."""
    gc.collect()
    assert _context._live == set()
    assert _context._installed == []
    assert torch.zeros is torch._C._VariableFunctions.zeros
    assert _context._block_device() is None
    assert _guard._KIND.current() is None
    assert _transfer_guard._KIND.current() is None
    assert _simulate_mode._active is None
    assert torch._C._len_torch_function_stack() == 0


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    assert_clean()
    yield
    assert_clean()


def guard_state() -> object:
    return _guard._KIND.current()


def mixes() -> None:
    """An op that mixes devices: raises under device_guard("error"), runs without one."""
    torch.mm(torch.ones(2, 3, device="cpu"), torch.ones(3, 4, device="meta"))


def guarded() -> bool:
    try:
        mixes()
    except CrossDeviceError:
        return True
    return False


def transfers() -> bool:
    try:
        torch.ones((), device="meta").item()
    except TransferGuardError:
        return True
    except Exception:
        return False
    return False


# Each scoped object, with what tells whether it is in force here.
SCOPES: dict[str, tuple[Callable[[], AbstractContextManager[Any]], Callable[[], bool]]] = {
    "default_device": (lambda: default_device("meta"), lambda: torch.zeros(1).device == META),
    "device_guard": (device_guard, guarded),
    "transfer_guard": (transfer_guard, transfers),
}


# --- one implementation: decorators -------------------------------------------------------------


@pytest.mark.parametrize("name", SCOPES)
def test_decorates_coroutine_functions(name: str) -> None:
    make, in_force = SCOPES[name]

    @make()  # type: ignore[operator]
    async def body() -> bool:
        await asyncio.sleep(0)
        return in_force()

    assert asyncio.run(body()) is True
    assert in_force() is False


def test_simulated_devices_decorates_coroutine_functions() -> None:
    # Issue 12: the body of a decorated `async def` ran outside the simulation, silently.
    @simulated_devices("cuda", 2)
    async def body() -> tuple[bool, int, str]:
        await asyncio.sleep(0)
        return (
            torch.cuda.is_available(),
            torch.cuda.device_count(),
            str(torch.ones(1).cuda().device),
        )

    assert asyncio.run(body()) == (True, 2, "cuda:0")
    assert torch.cuda.is_available() is False


@pytest.mark.parametrize(
    "decorator",
    [default_device("meta"), device_guard(), transfer_guard(), simulated_devices("xpu", 1)],
    ids=repr,
)
def test_every_scoped_object_refuses_generator_functions_alike(decorator: Any) -> None:
    def numbers() -> Iterator[int]:
        yield 1

    async def later() -> AsyncIterator[int]:
        yield 1

    for function in (numbers, later):
        with pytest.raises(
            devicekit.InvalidArgumentError,
            match=rf"^{__import__('re').escape(repr(decorator))} cannot decorate the generator "
            rf"function '.*{function.__name__}': its body runs between the caller's own steps",
        ):
            decorator(function)


# --- one object shared by threads and tasks (issue 18 item 5) -----------------------------------


@pytest.mark.parametrize("name", SCOPES)
def test_one_object_used_by_two_threads_leaving_in_any_order(name: str) -> None:
    make, in_force = SCOPES[name]
    shared = make()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    results: dict[tuple[str, str], object] = {}

    def first() -> None:  # enters first, leaves first
        try:
            with shared:
                a_in.set()
                assert b_in.wait(timeout=10)
                results["a", "inside"] = in_force()
            results["a", "after"] = in_force()
        except BaseException as error:
            results["a", "error"] = error
        a_out.set()

    def second() -> None:
        assert a_in.wait(timeout=10)
        try:
            with shared:
                b_in.set()
                assert a_out.wait(timeout=10)
                results["b", "inside"] = in_force()
            results["b", "after"] = in_force()
        except BaseException as error:
            results["b", "error"] = error

    # The thread that entered first leaves first: with one token stack per object it took the
    # other thread's token, raising `ValueError: Token ... created in a different Context`.
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert results == {
        ("a", "inside"): True,
        ("a", "after"): False,
        ("b", "inside"): True,
        ("b", "after"): False,
    }


@pytest.mark.parametrize("name", SCOPES)
def test_one_object_used_by_interleaved_asyncio_tasks(name: str) -> None:
    make, in_force = SCOPES[name]
    shared = make()

    async def task(delay: float) -> tuple[bool, bool]:
        with shared:
            await asyncio.sleep(delay)
            inside = in_force()
        return inside, in_force()

    async def main() -> list[tuple[bool, bool]]:
        return list(await asyncio.gather(task(0.02), task(0.0)))

    assert asyncio.run(main()) == [(True, False), (True, False)]


@pytest.mark.parametrize("name", SCOPES)
def test_an_out_of_order_manual_exit_raises_and_restores(name: str) -> None:
    make, in_force = SCOPES[name]
    outer, inner = make(), make()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(ScopeError, match=r"exited while blocks entered after it .* are ended too"):
        outer.__exit__(None, None, None)
    assert in_force() is False
    with pytest.raises(ScopeError, match=r"this block is not active in the current thread"):
        inner.__exit__(None, None, None)
    assert in_force() is False


@pytest.mark.parametrize("name", SCOPES)
def test_leaving_from_a_thread_that_did_not_enter_is_a_scope_error(name: str) -> None:
    make, in_force = SCOPES[name]
    block = make()
    errors: list[BaseException] = []

    def leave() -> None:
        try:
            block.__exit__(None, None, None)
        except BaseException as error:
            errors.append(error)

    with block:
        thread = threading.Thread(target=leave)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
        assert in_force() is True  # the other thread's mistake does not end this thread's block
    assert [type(error) for error in errors] == [ScopeError]
    assert "not active in the current thread or asyncio task" in str(errors[0])


# --- generators (issue 18 item 4) ---------------------------------------------------------------


def open_across_yield(make: Callable[[], AbstractContextManager[Any]]) -> Iterator[int]:
    """A generator that opens a block and yields once inside it."""
    with make():
        yield 1


@pytest.mark.parametrize("name", SCOPES)
def test_a_block_open_across_yield_is_seen_by_the_caller_until_the_generator_leaves_it(
    name: str,
) -> None:
    # The chosen semantics: a generator shares its caller's context (as a contextvars.ContextVar
    # set there does), which is what @contextmanager and pytest yield fixtures rely on.
    make, in_force = SCOPES[name]

    def steps() -> Iterator[int]:
        with make():
            yield 1
        yield 2

    iterator = steps()
    assert next(iterator) == 1
    assert in_force() is True
    assert next(iterator) == 2
    assert in_force() is False


@pytest.mark.parametrize("name", SCOPES)
def test_closing_a_generator_inside_the_callers_own_block(name: str) -> None:
    make, in_force = SCOPES[name]
    iterator = open_across_yield(make)
    next(iterator)
    outer = default_device("cpu")
    with outer, device_guard("warn"):
        iterator.close()  # used to raise ScopeError and end the caller's blocks with it
        assert torch.zeros(1).device == CPU  # the caller's own block is untouched
        assert guard_state() is not None
    assert in_force() is False


@pytest.mark.parametrize("name", SCOPES)
def test_a_generator_finalised_in_another_thread_ends_its_block_here(name: str) -> None:
    make, in_force = SCOPES[name]
    iterator = open_across_yield(make)
    next(iterator)
    thread = threading.Thread(target=iterator.close)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    # It used to leave the factories wrapped and the block in force here for good.
    assert in_force() is False
    gc.collect()
    assert _context._live == set()
    with device_guard():  # this thread's next devicekit block tidies the stack
        pass
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("name", SCOPES)
def test_async_generators_alike(name: str) -> None:
    make, in_force = SCOPES[name]

    async def steps() -> AsyncIterator[int]:
        with make():
            yield 1

    async def main() -> tuple[bool, bool, bool]:
        iterator = steps()
        await iterator.__anext__()
        seen = in_force()
        with default_device("cpu"):
            await iterator.aclose()
            caller = torch.zeros(1).device == CPU
        return seen, caller, in_force()

    assert asyncio.run(main()) == (True, True, False)


def test_a_generator_garbage_collected_with_its_block_open() -> None:
    def steps() -> Iterator[int]:
        with default_device("meta"), device_guard():
            yield 1

    iterator = steps()
    next(iterator)
    del iterator
    gc.collect()
    assert torch.zeros(1).device == CPU
    assert guard_state() is None


def test_a_context_manager_generator_opens_a_block_for_its_caller() -> None:
    @contextmanager
    def on_meta() -> Iterator[None]:
        with default_device("meta"), device_guard():
            yield

    with on_meta():
        assert torch.zeros(1).device == META
        assert guarded()
    assert torch.zeros(1).device == CPU


# --- the simulation's start and end (issue 18 item 6) -------------------------------------------


def test_a_failure_while_entering_a_simulation_leaves_nothing_active(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from devicekit import _discovery

    def broken(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_discovery, "register_simulated", broken)
    with pytest.raises(KeyboardInterrupt):
        simulated_devices("cuda", 2).__enter__()
    monkeypatch.undo()
    assert _simulate_mode._active is None
    assert torch.cuda.is_available() is False
    with simulated_devices("cuda", 2):  # used to be refused: "already active"
        assert torch.ones(1, device="cuda:1").device == torch.device("cuda", 1)


def test_a_simulation_left_from_another_thread_ends() -> None:
    simulation = simulated_devices("cuda", 2)
    simulation.__enter__()
    tagged = torch.ones(2, device="cuda:1")
    errors: list[BaseException] = []

    def leave() -> None:
        try:
            simulation.__exit__(None, None, None)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=leave)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert errors == []  # used to be IndexError: pop from empty mode stack
    assert torch.cuda.is_available() is False
    assert tagged.device == CPU
    assert (tagged * 2).tolist() == [2.0, 2.0]
    with device_guard():  # this thread's next devicekit block takes the ended mode off its stack
        pass
    assert torch._C._len_torch_function_stack() == 0


def test_a_simulation_left_out_of_order_with_a_guard() -> None:
    simulation, guard = simulated_devices("cuda", 2), device_guard()
    simulation.__enter__()
    guard.__enter__()
    simulation.__exit__(None, None, None)
    assert torch.cuda.is_available() is False
    assert guarded()  # the guard is still in force
    guard.__exit__(None, None, None)
    assert torch._C._len_torch_function_stack() == 0  # used to keep the simulation's mode


def test_leaving_a_simulation_that_is_not_active_is_a_scope_error() -> None:
    with pytest.raises(ScopeError, match=r"simulated_devices\('cuda', 2\): this simulation is not"):
        simulated_devices("cuda", 2).__exit__(None, None, None)


def test_entering_a_simulation_imports_nothing_for_its_side_effects() -> None:
    # torch._dynamo sets TORCHINDUCTOR_CACHE_DIR, adds warning filters and rewraps
    # torch.manual_seed on import: entering a simulation must not do that.
    script = textwrap.dedent(
        """
        import json, os, sys, warnings
        import torch, devicekit
        env, filters, seed = dict(os.environ), list(warnings.filters), torch.manual_seed
        before = "torch._dynamo" in sys.modules
        with devicekit.simulated_devices("cuda", 2):
            torch.ones(2, device="cuda:1") * 2
        print(json.dumps({
            "before": before,
            "dynamo": "torch._dynamo" in sys.modules,
            "env": dict(os.environ) == env,
            "filters": list(warnings.filters) == filters,
            "seed": torch.manual_seed is seed,
        }))
        """
    )
    found = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert json.loads(found.stdout) == {
        "before": False,
        "dynamo": False,
        "env": True,
        "filters": True,
        "seed": True,
    }


def test_dynamo_imported_inside_a_simulation_works_after_it() -> None:
    script = textwrap.dedent(
        """
        import torch, devicekit
        with devicekit.simulated_devices("cuda", 2):
            import torch._dynamo  # what the first optimizer would do
            assert torch.cuda.is_available()
        assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
        compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")
        print(compiled(torch.ones(2)).tolist())
        """
    )
    found = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "[3.0, 3.0]"
