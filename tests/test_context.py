"""`default_device`, `carry_default_device` and `current_device`."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
import devicekit._context as context
from devicekit import DeviceUnavailableError, InvalidDeviceSpecError, default_device
from tests.machine import REAL_CUDA

CPU, META = torch.device("cpu"), torch.device("meta")


def innermost_state() -> tuple[torch.device, torch.device, torch.device]:
    """What devicekit, torch and a factory call each say the default device is."""
    return devicekit.current_device(), torch.get_default_device(), torch.empty(1).device


def assert_untouched(*, collect: bool = True) -> None:
    """No block anywhere: torch runs exactly as without devicekit."""
    if collect:  # frames kept by finished asyncio tasks in reference cycles
        gc.collect()
    assert context._live == set()
    assert context._installed == []
    assert context._ACTIVE.get() is None
    assert torch.zeros is torch._C._VariableFunctions.zeros
    assert torch.get_default_device() == CPU
    assert torch._C._len_torch_function_stack() == 0


@pytest.fixture(autouse=True)
def _restored() -> Iterator[None]:
    assert_untouched()
    yield
    torch.set_default_device(None)
    assert_untouched()


# --- the block ----------------------------------------------------------------------------------


def test_factories_and_modules_allocate_on_the_device() -> None:
    with default_device("meta") as device:
        assert device == META
        assert innermost_state() == (META, META, META)
        made = [
            torch.zeros(2),
            torch.ones(2),
            torch.full((2,), 3.0),
            torch.rand(2),
            torch.randn(2),
            torch.randint(0, 5, (2,)),
            torch.arange(3),
            torch.linspace(0, 1, 3),
            torch.eye(2),
            torch.tensor([1.0]),
            torch.as_tensor([1.0]),
            torch.normal(0.0, 1.0, (2,)),
            torch.fft.fftfreq(4),
        ]
        assert {tensor.device for tensor in made} == {META}
        module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        assert {t.device for t in [*module.parameters(), *module.buffers()]} == {META}
    assert innermost_state() == (CPU, CPU, CPU)


def test_as_device_and_to_device_use_the_block() -> None:
    with default_device("meta"):
        assert devicekit.as_device(None) == META
        assert devicekit.to_device(torch.ones(2, device="cpu")).device == META
    assert devicekit.as_device(None) == devicekit.current_device()


def test_explicit_device_wins_and_like_functions_follow_their_input() -> None:
    cpu_tensor = torch.ones(2)
    with default_device("meta"):
        assert torch.zeros(2, device="cpu").device == CPU
        assert torch.tensor([1], device=CPU).device == CPU
        assert torch.zeros_like(cpu_tensor).device == CPU
        assert torch.rand_like(cpu_tensor).device == CPU
        assert cpu_tensor.new_zeros(2).device == CPU
        assert torch.normal(cpu_tensor, 1.0).device == CPU
        # `device=None`, as nn.Module constructors pass it, means "the default".
        assert torch.empty(2, device=None).device == META


def test_out_argument_decides_the_device() -> None:
    out = torch.empty(2)
    with default_device("meta"):
        assert torch.zeros(2, out=out) is out
        assert out.device == CPU


def test_blocks_nest_and_the_innermost_wins() -> None:
    with default_device("meta"):
        with default_device("cpu"):
            assert innermost_state() == (CPU, CPU, CPU)
            with default_device("meta"):
                assert innermost_state() == (META, META, META)
            assert innermost_state() == (CPU, CPU, CPU)
        assert innermost_state() == (META, META, META)


def test_one_object_can_be_reentered() -> None:
    meta, cpu = default_device("meta"), default_device("cpu")
    with meta, cpu, meta:
        assert innermost_state() == (META, META, META)
        with cpu:
            assert innermost_state() == (CPU, CPU, CPU)
        assert innermost_state() == (META, META, META)
    assert context._ACTIVE.get() is None


def test_restores_when_the_block_raises() -> None:
    with pytest.raises(KeyError), default_device("meta"):
        raise KeyError("boom")
    assert context._ACTIVE.get() is None


def test_an_out_of_order_exit_raises_and_still_restores_the_state() -> None:
    outer, inner = default_device("meta"), default_device("cpu")
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(
        devicekit.ScopeError,
        match=r"^default_device\(\): exited while blocks entered after it in this thread or task "
        r"were still open \(devicekit\.default_device\('cpu'\)\); they are ended too",
    ):
        outer.__exit__(None, None, None)
    assert context._ACTIVE.get() is None
    assert torch.zeros(1).device == CPU
    with pytest.raises(devicekit.ScopeError, match="this block is not active"):
        inner.__exit__(None, None, None)


def test_an_out_of_order_exit_during_an_exception_restores_without_masking_it() -> None:
    outer, inner = default_device("meta"), default_device("cpu")

    def fails() -> None:
        with outer:
            inner.__enter__()
            raise KeyError("the real error")

    with pytest.raises(KeyError, match="the real error"):
        fails()
    assert context._ACTIVE.get() is None


def test_exiting_a_block_that_is_not_active_names_the_fix() -> None:
    block = default_device("meta")
    with pytest.raises(devicekit.ScopeError, match=r"default_device\(\): this block is not active"):
        block.__exit__(None, None, None)


def test_spec_is_validated_when_the_block_is_made() -> None:
    with pytest.raises(InvalidDeviceSpecError, match=r"^default_device\('bogus'\)"):
        default_device("bogus")
    with pytest.raises(DeviceUnavailableError, match=r"^default_device\('cuda:7'\)"):
        default_device("cuda:7")


def test_repr_names_the_device() -> None:
    assert repr(default_device("meta")) == "devicekit.default_device('meta')"


# --- as a decorator -----------------------------------------------------------------------------


def test_decorates_plain_functions_and_keeps_their_metadata() -> None:
    @default_device("meta")
    def build(size: int, *, fill: float = 0.0) -> torch.Tensor:
        """Docstring."""
        return torch.full((size,), fill)

    assert build.__name__ == "build"
    assert build.__doc__ == "Docstring."
    assert build(3, fill=1.0).device == META
    assert torch.zeros(1).device == CPU


def test_decorates_async_functions() -> None:
    @default_device("meta")
    async def build() -> torch.device:
        await asyncio.sleep(0)
        return torch.zeros(1).device

    assert asyncio.run(build()) == META


def test_refuses_generator_functions() -> None:
    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(
        devicekit.InvalidArgumentError, match="cannot decorate the generator function"
    ):
        default_device("meta")(numbers)


# --- threads and tasks --------------------------------------------------------------------------


def test_other_threads_never_see_the_block() -> None:
    # torch's fault (pytorch#115917): a thread silently gets `cpu` after set_default_device in
    # another. devicekit's contract says so up front, and carry_default_device crosses over.
    seen: list[tuple[torch.device, torch.device, torch.device]] = []
    with default_device("meta"):
        worker = threading.Thread(target=lambda: seen.append(innermost_state()))
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert seen == [(CPU, CPU, CPU)]


def test_carry_default_device_takes_the_block_into_a_pool() -> None:
    with ThreadPoolExecutor(2) as pool:
        with default_device("meta"):
            carried = devicekit.carry_default_device(innermost_state)
        assert pool.submit(carried).result() == (META, META, META)
    # Carrying "no block" runs the function outside any block, wherever it is called.
    nothing = devicekit.carry_default_device(innermost_state)
    with default_device("meta"):
        assert nothing() == (CPU, CPU, CPU)
        assert innermost_state() == (META, META, META)


def test_interleaved_tasks_never_see_each_others_device() -> None:
    # torch's fault: its mode stack is per thread, so `with torch.device(...)` in one task is
    # seen by every other task that runs while the first is suspended inside its block.
    async def worker(spec: str, seen: list[torch.device]) -> None:
        with default_device(spec):
            for _ in range(3):
                await asyncio.sleep(0)
                seen.extend(innermost_state())

    async def main() -> tuple[list[torch.device], list[torch.device]]:
        on_meta: list[torch.device] = []
        on_cpu: list[torch.device] = []
        await asyncio.gather(worker("meta", on_meta), worker("cpu", on_cpu))
        return on_meta, on_cpu

    on_meta, on_cpu = asyncio.run(main())
    assert set(on_meta) == {META}
    assert set(on_cpu) == {CPU}


def test_tasks_keep_the_device_they_were_created_with() -> None:
    async def later() -> tuple[torch.device, torch.device, torch.device]:
        await asyncio.sleep(0.01)
        return innermost_state()

    async def main() -> tuple[torch.device, torch.device, torch.device]:
        with default_device("meta"):
            task = asyncio.create_task(later())
        return await task

    assert asyncio.run(main()) == (META, META, META)


# --- torch's own default device -----------------------------------------------------------------


def test_torch_context_inside_the_block_wins_until_it_ends() -> None:
    with default_device("meta"):
        with torch.device("cpu"):
            assert innermost_state() == (CPU, CPU, CPU)
        assert innermost_state() == (META, META, META)


def test_block_inside_torch_context_wins_until_it_ends() -> None:
    with torch.device("meta"):
        with default_device("cpu"):
            assert innermost_state() == (CPU, CPU, CPU)
        assert torch.get_default_device() == META
        assert torch.empty(1).device == META


def test_torch_settings_older_than_the_block_never_override_it() -> None:
    # Not nested, as when asyncio tasks interleave: torch's setting ends inside the block.
    torch.set_default_device("cpu")
    inner_torch = torch.device("cpu")
    inner_torch.__enter__()
    with default_device("meta"):
        assert innermost_state() == (META, META, META)
        inner_torch.__exit__(None, None, None)  # back to the set_default_device mode: older
        assert innermost_state() == (META, META, META)
        torch.set_default_device(None)  # no torch setting at all
        assert innermost_state() == (META, META, META)
    assert innermost_state()[1:] == (CPU, CPU)


def test_set_default_device_inside_the_block_outlives_it() -> None:
    with default_device("meta"):
        torch.set_default_device("cpu")
        assert innermost_state() == (CPU, CPU, CPU)
        torch.set_default_device(None)
        assert innermost_state() == (META, META, META)
        torch.set_default_device("meta")
    assert torch.get_default_device() == META
    torch.set_default_device(None)
    assert torch.get_default_device() == CPU


def test_set_default_device_inside_a_block_does_not_stick_afterwards() -> None:
    # torch's fault: `set_default_device` inside `with torch.device("meta")` leaves `meta`
    # behind once `set_default_device(None)` runs after the block.
    with default_device("meta"):
        torch.set_default_device("cpu")
    torch.set_default_device(None)
    assert (torch.get_default_device(), torch.empty(1).device) == (CPU, CPU)


def test_user_function_modes_keep_working() -> None:
    class Counting(torch.overrides.TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[object] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    with default_device("meta"), Counting() as counting:
        assert torch.zeros(2).device == META
        assert (torch.ones(2) + 1).device == META
    # The mode sees torch's own functions, as without devicekit.
    functions = torch._C._VariableFunctions
    assert {functions.zeros, functions.ones, torch.Tensor.add} <= set(counting.calls)
    assert torch._C._len_torch_function_stack() == 0


# --- what devicekit adds ------------------------------------------------------------------------


def test_nothing_is_installed_outside_blocks() -> None:
    # torch's fault (pytorch#92701): its default device slows every torch call down, because a
    # function mode sits on the stack. devicekit never pushes one, inside a block or outside.
    with default_device("meta"):
        assert len(context._live) == 1
        assert torch.zeros is not torch._C._VariableFunctions.zeros
        assert torch._C._len_torch_function_stack() == 0
    assert_untouched()


def test_covers_every_factory_torch_covers() -> None:
    import torch.utils._device

    with default_device("meta"):
        wrapped = {f for swap in context._installed for f in swap.originals.values()}
    assert set(torch.utils._device._device_constructors()) <= wrapped
    # torch's own tables must still hold the built-ins, not devicekit's wrappers.
    assert torch.zeros in torch.utils._device._device_constructors()


# --- random programs over threads and tasks ------------------------------------------------------


@dataclass(frozen=True)
class Enter:
    device: str


@dataclass(frozen=True)
class Exit:
    pass


@dataclass(frozen=True)
class Check:
    pass


@dataclass(frozen=True)
class Yield:
    pass


@dataclass(frozen=True)
class Spawn:
    """Start an asyncio task running `program`; it starts inside the blocks active here."""

    program: tuple[object, ...]


# `meta` is the second device on a CPU-only machine; with CUDA, the first GPU joins in.
DEVICES = ["cpu", "meta", *(["cuda:0"] if REAL_CUDA else [])]
simple_steps = st.one_of(
    st.sampled_from(DEVICES).map(Enter),
    st.just(Exit()),
    st.just(Check()),
    st.just(Yield()),
)
programs = st.recursive(
    st.lists(simple_steps, max_size=8).map(tuple),
    lambda children: st.lists(st.one_of(simple_steps, children.map(Spawn)), max_size=8).map(tuple),
    max_leaves=20,
)


async def run_program(program: tuple[object, ...], expected: list[torch.device]) -> None:
    """Run the steps in this task, checking after each that the innermost block is in force.

    `expected` starts as the devices of the blocks this task was created inside, after the
    device in force outside any block.
    """
    blocks: list[default_device] = []
    children: list[asyncio.Task[None]] = []
    for step in program:
        if isinstance(step, Enter):
            block = default_device(step.device)
            block.__enter__()
            blocks.append(block)
            expected.append(block.device)
        elif isinstance(step, Exit) and blocks:
            blocks.pop().__exit__(None, None, None)
            expected.pop()
        elif isinstance(step, Yield):
            await asyncio.sleep(0)
        elif isinstance(step, Spawn):
            children.append(asyncio.create_task(run_program(step.program, list(expected))))
        assert_in_force(expected)
    while blocks:
        blocks.pop().__exit__(None, None, None)
        expected.pop()
    assert_in_force(expected)
    await asyncio.gather(*children)


def assert_in_force(expected: list[torch.device]) -> None:
    if len(expected) == 1:  # no block: devicekit's own default, and torch's
        assert innermost_state() == (expected[0], CPU, CPU)
    else:
        assert innermost_state() == (expected[-1],) * 3


@settings(max_examples=40)
@given(st.lists(programs, min_size=1, max_size=3), st.lists(programs, max_size=3))
def test_random_programs_see_their_own_innermost_block(
    threads: list[tuple[object, ...]], main_tasks: list[tuple[object, ...]]
) -> None:
    outside = devicekit.current_device()
    failures: list[BaseException] = []
    start = threading.Barrier(len(threads) + 1)

    def in_thread(program: tuple[object, ...]) -> None:
        try:
            start.wait()
            asyncio.run(run_program(program, [outside]))
        except BaseException as error:  # handed to the main thread
            failures.append(error)

    async def main() -> None:
        await asyncio.gather(*(run_program(p, [outside]) for p in main_tasks))

    workers = [threading.Thread(target=in_thread, args=(p,)) for p in threads]
    for worker in workers:
        worker.start()
    start.wait()
    asyncio.run(main())
    for worker in workers:
        worker.join(timeout=120)
        assert not worker.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    if failures:
        raise failures[0]
    assert_untouched()


torch_steps = st.recursive(
    st.just(()),
    lambda inner: st.lists(
        st.tuples(st.sampled_from(["devicekit", "torch"]), st.sampled_from(DEVICES), inner),
        max_size=3,
    ).map(tuple),
    max_leaves=12,
)


def run_nested(tree: tuple[tuple[str, str, object], ...], expected: torch.device) -> None:
    assert innermost_state()[1:] == (expected, expected)
    for kind, spec, inner in tree:
        block = default_device(spec) if kind == "devicekit" else torch.device(spec)
        with block:
            run_nested(inner, torch.device(spec))  # type: ignore[arg-type]
        assert innermost_state()[1:] == (expected, expected)


@settings(max_examples=50)
@given(torch_steps)
def test_devicekit_and_torch_blocks_mix_and_the_innermost_wins(
    tree: tuple[tuple[str, str, object], ...],
) -> None:
    run_nested(tree, CPU)
    assert_untouched(collect=False)


# --- torch.compile ------------------------------------------------------------------------------


def test_torch_compile_works_inside_and_after_blocks() -> None:
    # In a fresh interpreter, so that TorchDynamo is first imported inside a block: torch's
    # lazily built tables of its own functions must still hold the built-ins afterwards.
    code = """
        import json, torch, devicekit

        def make(x):
            return x + torch.arange(4), torch.zeros(2)

        with devicekit.default_device("meta"):
            import torch._dynamo
            compiled = torch.compile(make, backend="eager", fullgraph=True)
            inside = [str(t.device) for t in compiled(torch.ones(4))]
        after = [str(t.device) for t in compiled(torch.ones(4))]
        torch._dynamo.reset()
        fresh = torch.compile(make, backend="eager", fullgraph=True)
        print(json.dumps({
            "inside": inside,
            "after": after,
            "fresh": [str(t.device) for t in fresh(torch.ones(4))],
        }))
    """
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result == {
        "inside": ["meta", "meta"],
        "after": ["cpu", "cpu"],
        "fresh": ["cpu", "cpu"],
    }


@pytest.mark.skipif(REAL_CUDA, reason="simulates CUDA on a machine without it")
def test_simulated_cuda_devices_follow_the_block() -> None:
    with devicekit.simulated_devices("cuda", 2):
        with default_device("cuda:1"):
            cuda1 = torch.device("cuda", 1)
            assert innermost_state() == (cuda1, cuda1, cuda1)
            assert torch.nn.Linear(2, 2).weight.device == cuda1
        with default_device("cuda"):
            assert torch.ones(1).device == torch.device("cuda", 0)
    with pytest.raises(DeviceUnavailableError):
        default_device("cuda:1")


def test_asyncio_to_thread_carries_the_block() -> None:
    async def main() -> tuple[torch.device, torch.device, torch.device]:
        with default_device("meta"):
            return await asyncio.to_thread(innermost_state)

    assert asyncio.run(main()) == (META, META, META)


def test_leaves_other_patches_of_factories_alone() -> None:
    def fake_zeros(*size: int, **kwargs: object) -> torch.Tensor:
        return torch.ones(*size, **kwargs)  # type: ignore[arg-type]

    with default_device("meta"):
        saved = torch.zeros
        torch.zeros = fake_zeros  # a user's patch made inside the block...
    assert torch.zeros is fake_zeros  # ...survives the end of the block
    torch.zeros = saved  # and, undone, puts devicekit's wrapper back after the last block
    with default_device("meta"):
        assert torch.zeros(1).device == META
    assert torch.zeros is torch._C._VariableFunctions.zeros  # cleaned up by the next block
