"""`default_device`, `carry_default_device` and `current_device`."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import devicekit
import devicekit._context as context
from devicekit import DeviceUnavailableError, InvalidDeviceSpecError, default_device

CPU, META = torch.device("cpu"), torch.device("meta")


def innermost_state() -> tuple[torch.device, torch.device, torch.device]:
    """What devicekit, torch and a factory call each say the default device is."""
    return devicekit.current_device(), torch.get_default_device(), torch.empty(1).device


def assert_untouched() -> None:
    """No block anywhere: torch runs exactly as without devicekit."""
    gc.collect()
    assert context._holders == 0
    assert context._installed == {}
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


def test_exiting_an_outer_block_ends_the_ones_left_open_inside_it() -> None:
    outer, inner = default_device("meta"), default_device("cpu")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert context._ACTIVE.get() is None


def test_exiting_a_block_that_is_not_active_names_the_fix() -> None:
    block = default_device("meta")
    with pytest.raises(RuntimeError, match=r"default_device\(\): this block is not active"):
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

    with pytest.raises(TypeError, match="cannot decorate the generator function"):
        default_device("meta")(numbers)


# --- threads and tasks --------------------------------------------------------------------------


def test_other_threads_never_see_the_block() -> None:
    seen: list[tuple[torch.device, torch.device, torch.device]] = []
    with default_device("meta"):
        worker = threading.Thread(target=lambda: seen.append(innermost_state()))
        worker.start()
        worker.join()
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
    with default_device("meta"):
        assert context._holders == 1
        assert torch.zeros is not torch._C._VariableFunctions.zeros
        assert torch._C._len_torch_function_stack() == 0
    assert_untouched()


def test_covers_every_factory_torch_covers() -> None:
    import torch.utils._device

    with default_device("meta"):
        wrapped = {original for original, _ in context._installed.values()}
    assert set(torch.utils._device._device_constructors()) <= wrapped
    # torch's own tables must still hold the built-ins, not devicekit's wrappers.
    assert torch.zeros in torch.utils._device._device_constructors()
