"""The `torch.cuda` and `torch.accelerator` surface under `simulated_devices`: device facts,
memory accounting, random numbers, streams and events, legacy tensor types, and the table in
docs/simulation-surface.md that lists every public function."""

from __future__ import annotations

import contextlib
import gc
import inspect
import re
import time
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import InvalidArgumentError, SimulationError, simulated_devices
from devicekit._simulate_patches import UNSIMULATED
from tests.machine import REAL_CUDA

pytestmark = pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)
SURFACE_PAGE = Path(__file__).parent.parent / "docs" / "simulation-surface.md"


@pytest.fixture
def sim() -> Iterator[list[torch.device]]:
    with simulated_devices("cuda", 2) as made:
        yield made


# --- device facts ------------------------------------------------------------------------------


def test_default_facts_are_an_h100s(sim: object) -> None:
    properties = torch.cuda.get_device_properties(1)
    assert properties.name == "NVIDIA H100 80GB HBM3"
    assert properties.total_memory == 80 * 2**30
    assert (properties.major, properties.minor) == (9, 0)
    assert properties.multi_processor_count == 132
    assert repr(properties).startswith(
        "_CudaDeviceProperties(name='NVIDIA H100 80GB HBM3', major=9, minor=0, "
        "total_memory=81920MB, multi_processor_count=132"
    )
    assert torch.cuda.get_device_capability() == (9, 0)
    assert torch.cuda.get_device_capability("cuda:1") == (9, 0)
    assert torch.cuda.get_device_name() == "NVIDIA H100 80GB HBM3"
    assert torch.cuda.is_bf16_supported() is True
    assert torch.cuda.is_bf16_supported(including_emulation=False) is True
    assert torch.cuda.is_tf32_supported() is True
    assert torch.cuda.mem_get_info(1) == (80 * 2**30, 80 * 2**30)
    assert torch.cuda.get_arch_list() == ["sm_90"]
    assert torch.accelerator.get_device_capability()["supported_dtypes"] >= {torch.bfloat16}


def test_facts_are_chosen_at_entry() -> None:
    with simulated_devices("cuda", 1, memory="16GiB", capability=(7, 5), name="Tesla T4"):
        assert torch.cuda.get_device_name(0) == "Tesla T4"
        assert torch.cuda.get_device_capability(0) == (7, 5)
        assert torch.cuda.get_device_properties(0).total_memory == 16 * 2**30
        assert torch.cuda.mem_get_info() == (16 * 2**30, 16 * 2**30)
        assert torch.cuda.is_bf16_supported(including_emulation=False) is False
        assert torch.cuda.is_tf32_supported() is False
        assert torch.cuda.get_arch_list() == ["sm_75"]
        assert torch.bfloat16 not in torch.accelerator.get_device_capability()["supported_dtypes"]


@pytest.mark.parametrize(
    ("memory", "expected"),
    [("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29), ("2 TiB", 2 * 2**40), (4096, 4096)],
)
def test_memory_sizes(memory: int | str, expected: int) -> None:
    with simulated_devices("cuda", 1, memory=memory):
        assert torch.cuda.get_device_properties().total_memory == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory": "lots"}, "memory='lots' is not an amount of memory"),
        ({"memory": 0}, "memory=0 must be positive"),
        ({"capability": (9,)}, "capability=(9,) is not a compute capability"),
        ({"capability": (9, "0")}, "is not a compute capability"),
        ({"name": ""}, "name='' is not a device name"),
    ],
)
def test_bad_facts_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)) as caught:
        simulated_devices("cuda", 2, **kwargs)  # type: ignore[arg-type]
    assert str(caught.value).startswith("simulated_devices('cuda', 2): ")


def test_initialisation_queries_answer_as_on_a_gpu(sim: object) -> None:
    torch.cuda.init()
    assert torch.cuda.is_initialized() is True
    torch.cuda.ipc_collect()
    torch.cuda.empty_cache()
    assert torch.version.cuda == "12.8"
    assert torch.backends.cudnn.is_available() is True
    assert torch.backends.cudnn.version() == 90100
    assert torch.cuda.can_device_access_peer(0, 1) is True
    assert torch.cuda.get_sync_debug_mode() == 0
    torch.cuda.set_sync_debug_mode("warn")
    assert torch.cuda.get_sync_debug_mode() == 1


def test_facts_are_restored_after_the_block() -> None:
    with simulated_devices("cuda", 2):
        pass
    assert torch.version.cuda is None
    assert torch.cuda.is_initialized() is False
    assert torch.backends.cudnn.is_available() is False


def test_set_device_moves_devicekits_current_device_too(sim: object) -> None:
    torch.cuda.set_device(1)
    assert devicekit.as_device("cuda") == CUDA1
    assert str(devicekit.current_device()) == "cuda:1"
    assert torch.ones(1).cuda().device == CUDA1
    with torch.accelerator.device_index(0):
        assert torch.cuda.current_device() == 0
        assert devicekit.as_device("cuda") == CUDA0
    assert torch.accelerator.current_device_index() == 1


# --- memory ------------------------------------------------------------------------------------


def test_memory_counts_live_tensors(sim: object) -> None:
    before = torch.cuda.memory_allocated()
    x = torch.empty(1 << 20, device="cuda")
    assert torch.cuda.memory_allocated() - before == 4 << 20
    view = x[10:]
    assert torch.cuda.memory_allocated() - before == 4 << 20  # views share the storage
    y = x * 2
    assert torch.cuda.memory_allocated() - before == 8 << 20
    assert torch.cuda.memory_allocated(1) == 0  # another device counts its own
    del x, view, y
    gc.collect()
    assert torch.cuda.memory_allocated() == before


def test_peaks_and_stats(sim: object) -> None:
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(1 << 20, device="cuda:1")
    del x
    assert torch.cuda.memory_allocated(1) == 0
    assert torch.cuda.max_memory_allocated(1) == 4 << 20
    assert torch.cuda.max_memory_reserved(1) == 4 << 20
    stats = torch.cuda.memory_stats(1)
    assert stats["allocated_bytes.all.peak"] == 4 << 20
    assert stats["allocated_bytes.large_pool.allocated"] == 4 << 20
    assert stats["allocation.all.freed"] == 1
    assert torch.cuda.memory_stats_as_nested_dict(1)["allocated_bytes"]["all"]["peak"] == 4 << 20
    torch.cuda.reset_peak_memory_stats(1)
    assert torch.cuda.max_memory_allocated(1) == 0
    torch.accelerator.reset_accumulated_memory_stats(1)
    assert torch.cuda.memory_stats(1)["allocation.all.allocated"] == 0
    summary = torch.cuda.memory_summary(1)
    assert "PyTorch CUDA memory summary, device ID 1" in summary
    assert "Allocated memory" in summary


def test_accelerator_memory_answers_from_the_same_counts(sim: object) -> None:
    x = torch.empty(256, device="cuda")
    assert torch.accelerator.memory_allocated() == torch.cuda.memory_allocated() >= 1024
    free, total = torch.accelerator.get_memory_info()
    assert total == 80 * 2**30
    assert free == total - torch.cuda.memory_allocated()
    torch.accelerator.empty_cache()
    del x


def test_out_of_memory_like_cuda() -> None:
    with simulated_devices("cuda", 2, memory="1MiB"):
        x = torch.empty(200_000, device="cuda:1")  # 800 kB of 1 MiB
        with pytest.raises(torch.OutOfMemoryError) as caught:
            torch.empty(100_000, device="cuda:1")
        message = str(caught.value)
        assert message.startswith(
            "CUDA out of memory. Tried to allocate 390.62 KiB. GPU 1 has a total capacity of "
            "1.00 MiB of which 242.75 KiB is free."
        )
        assert "simulated_devices(..., memory=...)" in message
        with pytest.raises(torch.OutOfMemoryError, match=re.escape("Tried to allocate 781.25 KiB")):
            x + 1  # an op's result counts too
        assert torch.cuda.memory_stats(1)["num_ooms"] == 2
        torch.empty(200_000, device="cuda:0")  # the other device has its own memory
        del x
        gc.collect()
        torch.empty(200_000, device="cuda:1")


def test_out_of_memory_before_the_cpu_tries() -> None:
    with simulated_devices("cuda", 1), pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(1 << 48, dtype=torch.uint8, device="cuda")  # 256 TiB: more than any CPU
    assert "Tried to allocate 256.00 TiB" in str(caught.value)


def test_memory_fraction_lowers_the_limit() -> None:
    with simulated_devices("cuda", 1, memory="1MiB"):
        torch.cuda.set_per_process_memory_fraction(0.5)
        assert torch.cuda.get_per_process_memory_fraction() == 0.5
        with pytest.raises(TypeError, match="must be `float`"):
            torch.cuda.set_per_process_memory_fraction(1)
        with pytest.raises(ValueError, match="Allowed range: 0~1"):
            torch.cuda.set_per_process_memory_fraction(1.5)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(200_000, device="cuda")


def test_a_batch_size_finder_finds_the_largest_fitting_batch() -> None:
    """The code OOM tests are for: halve the batch until a step fits."""
    with simulated_devices("cuda", 1, memory="4MiB"):
        model = torch.nn.Linear(256, 256).cuda()
        batch = 4096
        while True:
            try:
                model(torch.randn(batch, 256, device="cuda")).sum().backward()
                break
            except torch.OutOfMemoryError:
                batch //= 2
        assert batch == 1024  # 2048 needs 4 MiB for its input and output alone


@settings(max_examples=30)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5000), st.booleans()), max_size=12))
def test_allocated_is_the_sum_of_live_storages(steps: list[tuple[int, int, bool]]) -> None:
    with simulated_devices("cuda", 2):
        live: list[torch.Tensor] = []
        for index, size, drop in steps:
            live.append(torch.empty(size, device=f"cuda:{index}"))
            if drop and live:
                live.pop(0)
        for index in (0, 1):
            expected = sum(t.untyped_storage().nbytes() for t in live if t.device.index == index)
            assert torch.cuda.memory_allocated(index) == expected


# --- random numbers ----------------------------------------------------------------------------


def test_manual_seed_all_reproduces_cuda_draws(sim: object) -> None:
    torch.cuda.manual_seed_all(0)
    a = torch.randn(4, device="cuda").cpu()
    b = torch.rand(4, device="cuda:1").cpu()
    torch.cuda.manual_seed_all(0)
    assert torch.equal(a, torch.randn(4, device="cuda").cpu())
    assert torch.equal(b, torch.rand(4, device="cuda:1").cpu())


@settings(max_examples=25)
@given(seed=st.integers(0, 2**63 - 1), size=st.integers(1, 50), index=st.integers(0, 1))
def test_seeded_cuda_draws_are_reproducible_and_leave_the_cpu_alone(
    seed: int, size: int, index: int
) -> None:
    with simulated_devices("cuda", 2):
        cpu_state = torch.get_rng_state()
        torch.cuda.manual_seed_all(seed)
        drawn = torch.randn(size, device=f"cuda:{index}").cpu()
        expected = torch.randn(size, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(drawn, expected)
        assert torch.equal(torch.get_rng_state(), cpu_state)


def test_the_cpu_generator_and_the_cuda_ones_are_separate(sim: object) -> None:
    torch.cuda.manual_seed_all(0)
    torch.default_generator.manual_seed(1)  # seeds the CPU only
    a = torch.randn(4, device="cuda").cpu()
    torch.cuda.manual_seed_all(0)
    torch.default_generator.manual_seed(2)
    assert torch.equal(a, torch.randn(4, device="cuda").cpu())
    cpu_state = torch.get_rng_state()
    torch.randn(4, device="cuda")
    torch.ones(8, device="cuda").uniform_()
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), 0.5)
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_each_device_has_its_own_generator(sim: object) -> None:
    torch.cuda.manual_seed_all(0)
    first = torch.randn(4, device="cuda:0").cpu()
    assert torch.equal(torch.randn(4, device="cuda:1").cpu(), first)  # untouched by cuda:0
    torch.cuda.set_device(1)
    torch.cuda.manual_seed(5)  # the current device only
    assert torch.cuda.initial_seed() == 5
    torch.cuda.set_device(0)
    assert torch.cuda.initial_seed() == 0


def test_torch_manual_seed_seeds_the_cuda_generators_as_on_a_gpu(sim: object) -> None:
    torch.manual_seed(3)
    a = torch.randn(4, device="cuda").cpu()
    torch.manual_seed(3)
    assert torch.equal(a, torch.randn(4, device="cuda").cpu())
    assert torch.cuda.initial_seed() == 3


def test_rng_state_round_trips(sim: object) -> None:
    state = torch.cuda.get_rng_state("cuda:1")
    assert state.dtype == torch.uint8
    assert state.device.type == "cpu"
    a = torch.randn(4, device="cuda:1").cpu()
    torch.cuda.set_rng_state(state, "cuda:1")
    assert torch.equal(a, torch.randn(4, device="cuda:1").cpu())
    states = torch.cuda.get_rng_state_all()
    b = torch.randn(4, device="cuda:0").cpu()
    torch.cuda.set_rng_state_all(states)
    assert torch.equal(b, torch.randn(4, device="cuda:0").cpu())
    assert len(torch.cuda.default_generators) == 2


def test_fork_rng_restores_the_cuda_state(sim: object) -> None:
    torch.cuda.manual_seed_all(0)
    with torch.random.fork_rng(device_type="cuda", devices=[0, 1]):
        torch.randn(4, device="cuda:1")
    assert torch.equal(torch.cuda.get_rng_state(1), _seeded_state(0))


def _seeded_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def test_generators_of_simulated_devices(sim: object) -> None:
    generator = torch.Generator(device="cuda:1")
    assert generator.device == CUDA1
    assert isinstance(generator, torch.Generator)
    assert isinstance(torch.default_generator, torch.Generator)
    assert torch.Generator().device == torch.device("cpu")
    generator.manual_seed(7)
    a = torch.randn(3, device="cuda:1", generator=generator).cpu()
    assert torch.equal(a, torch.randn(3, generator=torch.Generator().manual_seed(7)))
    assert torch.Generator(device="cuda").device == CUDA0


def test_a_cpu_generator_for_a_cuda_op_is_refused_like_cuda(sim: object) -> None:
    with pytest.raises(RuntimeError) as caught:
        torch.randn(3, device="cuda:1", generator=torch.Generator())
    assert str(caught.value).startswith(
        "Expected a 'cuda' device type for generator but found 'cpu'."
    )
    assert "torch.Generator(device='cuda:1')" in str(caught.value)
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.ones(3, device="cuda").uniform_(generator=torch.Generator())


def test_a_cuda_generator_for_a_cpu_op_is_refused_like_cuda(sim: object) -> None:
    generator = torch.Generator(device="cuda:1")
    cpu_ops = {
        "randn": lambda: torch.randn(3, generator=generator),
        "randn(device='cpu')": lambda: torch.randn(3, generator=generator, device="cpu"),
        "normal_": lambda: torch.empty(3).normal_(generator=generator),
        "randperm": lambda: torch.randperm(4, generator=generator),
        "multinomial": lambda: torch.multinomial(torch.ones(3), 2, generator=generator),
    }
    for label, op in cpu_ops.items():
        with pytest.raises(RuntimeError) as caught:
            op()
        message = str(caught.value)
        expected = "Expected a 'cpu' device type for generator but found 'cuda'."
        assert message.startswith(expected), label
        assert "simulated cuda:1" in message, label
        assert "torch.Generator()" in message, label
    # The same generator on its own device still draws, from a tensor, `device=` or the default.
    assert torch.empty(3, device="cuda:1").normal_(generator=generator).device == CUDA1
    assert torch.randperm(4, generator=generator, device="cuda:1").device == CUDA1
    with torch.device("cuda:1"):
        assert torch.randn(2, generator=generator).device == CUDA1
    assert torch.randn(2, generator=torch.Generator()).device == torch.device("cpu")


def test_module_initialisation_on_a_simulated_device_draws_from_it(sim: object) -> None:
    torch.cuda.manual_seed_all(0)
    first = torch.nn.Linear(4, 4, device="cuda").weight.detach().cpu()
    torch.cuda.manual_seed_all(0)
    torch.default_generator.manual_seed(99)
    assert torch.equal(first, torch.nn.Linear(4, 4, device="cuda").weight.detach().cpu())


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_dropout(sim: object, reentrant: bool) -> None:
    """torch.utils.checkpoint saves the cuda generator's state and recomputes in backward: the
    recomputed dropout mask must be the forward's, or the gradients are silently wrong."""
    from torch.utils.checkpoint import checkpoint

    linear = torch.nn.Linear(8, 8).cuda()
    x = torch.randn(4, 8, device="cuda", requires_grad=True)

    def block(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(linear(t), 0.5, training=True)

    torch.cuda.manual_seed_all(1)
    block(x).sum().backward()
    plain = x.grad.cpu()
    x.grad = None
    torch.cuda.manual_seed_all(1)
    checkpoint(block, x, use_reentrant=reentrant).sum().backward()
    assert torch.equal(x.grad.cpu(), plain)


# --- streams and events ------------------------------------------------------------------------


def test_streams_and_events_are_torch_classes(sim: object) -> None:
    stream = torch.cuda.current_stream()
    assert isinstance(stream, torch.Stream)
    assert isinstance(stream, torch.cuda.Stream)
    assert isinstance(torch.cuda.Stream(device=1), torch.Stream)
    assert isinstance(torch.cuda.Event(), torch.Event)
    assert isinstance(torch.Stream(device="cuda:1"), torch.cuda.Stream)
    assert isinstance(torch.Stream(device="cpu"), torch.Stream)
    assert torch.Stream("cuda:1").device == CUDA1
    event = torch.Event("cuda:1", enable_timing=True)
    assert isinstance(event, torch.cuda.Event)
    assert event.device == CUDA1
    assert stream.device == CUDA0
    assert torch.cuda.Stream(device=1).device == CUDA1
    assert torch.cuda.current_stream() == torch.cuda.default_stream() == stream

    class Mine(torch.Stream):  # subclassing inside the block (TorchDynamo does on import)
        pass

    assert isinstance(Mine(device="cpu"), Mine)

    def annotated(s: torch.Stream | None = None, e: torch.cuda.Event | None = None) -> None: ...

    assert typing.get_type_hints(annotated)["s"] == torch.Stream | None


def test_record_stream_and_synchronisation(sim: object) -> None:
    stream = torch.cuda.Stream()
    x = torch.ones(2, device="cuda")
    x.record_stream(stream)
    stream.wait_stream(torch.cuda.current_stream())
    event = stream.record_event()
    stream.wait_event(event)
    event.wait()
    assert stream.query()
    assert event.query()
    stream.synchronize()
    event.synchronize()
    torch.cuda.synchronize()


def test_elapsed_time_is_wall_clock_milliseconds(sim: object) -> None:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    time.sleep(0.02)
    end.record()
    end.synchronize()
    assert 15 <= start.elapsed_time(end) < 2000
    with pytest.raises(ValueError, match="enable_timing=True"):
        torch.cuda.Event().elapsed_time(end)


def test_stream_context_switches_the_current_device(sim: object) -> None:
    side = torch.cuda.Stream(device=1)
    with torch.cuda.stream(side):
        assert torch.cuda.current_device() == 1
        assert torch.cuda.current_stream() == side
        assert torch.ones(1, device="cuda").device == CUDA1
    assert torch.cuda.current_device() == 0
    assert torch.cuda.current_stream(1) != side
    with side:
        assert torch.cuda.current_device() == 1
    with torch.cuda.stream(None):
        assert torch.cuda.current_device() == 0
    torch.cuda.set_stream(side)
    assert torch.cuda.current_stream(1) == side
    torch.accelerator.set_stream(torch.cuda.default_stream(1))
    assert torch.accelerator.current_stream(1) == torch.cuda.default_stream(1)


def test_nvtx_is_accepted(sim: object) -> None:
    assert torch.cuda.nvtx.range_push("step") == 0
    assert torch.cuda.nvtx.range_pop() == 0
    torch.cuda.nvtx.mark("here")
    handle = torch.cuda.nvtx.range_start("r")
    torch.cuda.nvtx.range_end(handle)
    with torch.cuda.nvtx.range("forward"):
        pass


# --- legacy tensor types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: torch.cuda.FloatTensor(3), (3,)),
        (lambda: torch.cuda.FloatTensor(2, 3), (2, 3)),
        (lambda: torch.cuda.FloatTensor([1.0, 2.0]), (2,)),
    ],
)
def test_legacy_constructors(
    sim: object, make: typing.Callable[[], torch.Tensor], shape: tuple[int, ...]
) -> None:
    made = make()
    assert made.device == CUDA0
    assert made.dtype == torch.float32
    assert made.shape == shape
    assert isinstance(made, torch.cuda.FloatTensor)
    assert not isinstance(made, torch.cuda.HalfTensor)
    assert not isinstance(torch.ones(2), torch.cuda.FloatTensor)
    assert made.type() == "torch.cuda.FloatTensor"


def test_legacy_type_conversions(sim: object) -> None:
    half = torch.ones(2).type(torch.cuda.HalfTensor)
    assert (half.device, half.dtype) == (CUDA0, torch.float16)
    assert torch.ones(2, device="cuda:1").type("torch.cuda.LongTensor").device == CUDA1
    back = half.type(torch.FloatTensor)
    assert (back.device, back.dtype) == (torch.device("cpu"), torch.float32)
    assert half.type(torch.float64).dtype == torch.float64
    assert half.type(torch.float64).device == CUDA0
    torch.cuda.set_device(1)
    assert torch.cuda.IntTensor(2).device == CUDA1


# --- everything else ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNSIMULATED))
def test_what_needs_a_gpu_raises_simulation_error(sim: object, name: str) -> None:
    target = getattr(torch.cuda, name)
    with pytest.raises(SimulationError) as caught:
        target(*([None] * _required(target)))
    message = str(caught.value)
    assert message.startswith(f"torch.cuda.{name}() is not simulated: it needs a real GPU.")
    assert "Instead, " in message
    if isinstance(target, type):
        assert target | None is not None  # still a class: annotations keep working


def test_storages_need_a_gpu(sim: object) -> None:
    with pytest.raises(SimulationError, match=r"torch.cuda.FloatStorage\(\) is not simulated"):
        torch.cuda.FloatStorage(2)
    assert isinstance(torch.cuda.FloatStorage, type)


def _required(function: object) -> int:
    try:
        parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0
    return sum(
        parameter.default is parameter.empty
        and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        for parameter in parameters
    )


def _public_callables(module: types.ModuleType) -> list[str]:
    """The public functions and classes torch defines in `module` (typing helpers left out)."""
    names = []
    for name in dir(module):
        value = getattr(module, name)
        if name.startswith("_") or isinstance(value, types.ModuleType) or not callable(value):
            continue
        if (getattr(value, "__module__", "") or "").startswith("torch"):
            names.append(name)
    return names


def test_no_function_says_torch_is_not_compiled_with_cuda(sim: object) -> None:
    """Every public function that takes no arguments answers, or raises SimulationError."""
    called = 0
    for module in (torch.cuda, torch.accelerator):
        for name in _public_callables(module):
            function = getattr(module, name)
            if isinstance(function, type) or _required(function) or name == "set_sync_debug_mode":
                continue
            with contextlib.suppress(SimulationError):
                function()
            called += 1
    assert called > 60


def _documented() -> dict[str, str]:
    """The rows of the table in docs/simulation-surface.md: function -> what simulation does."""
    rows = {}
    for line in SURFACE_PAGE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `(torch\.(?:cuda|accelerator)\.\w+)` \| (.+?) \|$", line)
        if match:
            rows[match[1]] = match[2]
    return rows


def test_the_docs_table_covers_every_public_function() -> None:
    documented = _documented()
    missing = [
        f"{module.__name__}.{name}"
        for module in (torch.cuda, torch.accelerator)
        for name in _public_callables(module)
        if f"{module.__name__}.{name}" not in documented
    ]
    assert not missing, f"add these to the table in {SURFACE_PAGE.name}: {missing}"
    for name in UNSIMULATED:
        assert documented[f"torch.cuda.{name}"].startswith("SimulationError"), name
