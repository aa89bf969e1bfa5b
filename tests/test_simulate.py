from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import CrossDeviceError, SimulationError, simulated_devices
from devicekit._simulate import _TAG
from devicekit.testing import nested_batches, tensors
from tests.machine import REAL_CUDA

pytestmark = pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def sim() -> object:
    with simulated_devices("cuda", 2) as made:
        yield made


# --- where tensors say they are ----------------------------------------------------------------


@pytest.mark.usefixtures("sim")
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.ones(2, device="cuda:1"), CUDA1),
        (lambda: torch.ones(2, device=CUDA1), CUDA1),
        (lambda: torch.zeros(2, 3, device="cuda"), CUDA0),
        (lambda: torch.tensor([1, 2], device="cuda:1"), CUDA1),
        (lambda: torch.arange(3).to("cuda:1"), CUDA1),
        (lambda: torch.arange(3).to(1), CUDA1),
        (lambda: torch.arange(3).to(device="cuda:1", dtype=torch.float64), CUDA1),
        (lambda: torch.arange(3).cuda(), CUDA0),
        (lambda: torch.arange(3).cuda(1), CUDA1),
        (lambda: torch.arange(3).cuda(device=1), CUDA1),
        (lambda: torch.ones(2, device="cuda:1").to(torch.float16), CUDA1),
        (lambda: torch.ones(2).to(torch.ones(1, device="cuda:1")), CUDA1),
        (lambda: torch.empty_like(torch.ones(2, device="cuda:1")), CUDA1),
        (lambda: torch.ones(2, device="cuda:1").new_zeros(3), CUDA1),
        (lambda: torch.ones(2, device="cuda:0").to("cpu"), torch.device("cpu")),
        (lambda: torch.ones(2, device="cuda:0").cpu(), torch.device("cpu")),
        (lambda: torch.ones(2, 2, device="cuda:1")[0], CUDA1),
        (lambda: torch.ones(2, 2, device="cuda:1").T, CUDA1),
        (lambda: torch.ones(2, device="cuda:1").data, CUDA1),
    ],
)
def test_tensors_report_the_simulated_device(
    make: Callable[[], torch.Tensor], expected: torch.device
) -> None:
    tensor = make()
    assert tensor.device == expected
    assert tensor.is_cuda == (expected.type == "cuda")
    assert tensor.is_cpu == (expected.type == "cpu")
    assert tensor.get_device() == (-1 if expected.index is None else expected.index)


def test_values_are_real_and_moves_copy(sim: object) -> None:
    source = torch.arange(6.0).reshape(2, 3)
    moved = source.to("cuda:1")
    assert moved is not source
    assert source.device == torch.device("cpu")
    moved.add_(1)
    assert torch.equal(source, torch.arange(6.0).reshape(2, 3))
    assert (moved * 2).sum().item() == 2 * (15 + 6)
    assert moved.to("cuda:1") is moved
    assert moved.to("cuda:0") is not moved
    assert "device='cuda:1'" in repr(moved)


def test_moving_back_returns_ordinary_cpu_tensors(sim: object) -> None:
    back = torch.ones(3, device="cuda:0").cpu()
    assert _TAG not in back.__dict__
    assert back.device == torch.device("cpu")
    assert back.numpy().tolist() == [1.0, 1.0, 1.0]


def test_numpy_of_a_simulated_tensor_is_refused_like_cuda(sim: object) -> None:
    with pytest.raises(TypeError, match=r"can't convert cuda:0 device type tensor to numpy"):
        torch.ones(1, device="cuda:0").numpy()


def test_tensors_are_ordinary_after_the_block() -> None:
    with simulated_devices("cuda", 2):
        inside = torch.ones(2, device="cuda:1")
    assert inside.device == torch.device("cpu")
    assert not inside.is_cuda
    assert inside.tolist() == [1.0, 1.0]
    with simulated_devices("cuda", 2):  # a later block simulating cuda:1 sees it there again
        assert inside.device == CUDA1
    with simulated_devices("cuda", 1):  # one that does not, sees an ordinary CPU tensor
        assert inside.device == torch.device("cpu")
        assert (inside + torch.ones(2)).tolist() == [2.0, 2.0]


# --- cross-device checks -----------------------------------------------------------------------

# The ops torch leaves unchecked between cpu and meta, and a few it checks.
OPS: list[tuple[str, Callable[[torch.Tensor, torch.Tensor], object]]] = [
    ("add", lambda a, b: a + b),
    ("mul", lambda a, b: torch.mul(a, b)),
    ("matmul", lambda a, b: a @ b),
    ("mm", lambda a, b: torch.mm(a, b)),
    ("addmm", lambda a, b: torch.addmm(a, a, b)),
    ("linear", lambda a, b: F.linear(a, b)),
    ("bmm", lambda a, b: torch.bmm(a[None], b[None])),
    ("einsum", lambda a, b: torch.einsum("ij,jk->ik", a, b)),
    ("cat", lambda a, b: torch.cat([a, b])),
    ("stack", lambda a, b: torch.stack((a, b))),
    ("where", lambda a, b: torch.where(a > 0, a, b)),
    ("embedding", lambda a, b: F.embedding(b.long().abs() % 3, a)),
    ("index_select", lambda a, b: torch.index_select(a, 0, b.long().abs()[0] % 3)),
    ("gather", lambda a, b: torch.gather(a, 1, b.long().abs() % 3)),
    ("scatter_add", lambda a, b: a.scatter_add(0, b.long().abs() % 3, a)),
    ("conv2d", lambda a, b: F.conv2d(a[None, None], b[None, None])),
    ("copy into view", lambda a, b: a.add_(b)),
]


@pytest.mark.parametrize(("name", "op"), OPS, ids=[name for name, _ in OPS])
@pytest.mark.parametrize("other", ["cuda:1", "cpu"])
def test_mixing_devices_raises_for_every_op(
    sim: object, name: str, op: Callable[[torch.Tensor, torch.Tensor], object], other: str
) -> None:
    a = torch.ones(3, 3, device="cuda:0")
    b = torch.ones(3, 3).to(other)
    with pytest.raises(
        CrossDeviceError, match=rf"devices, cuda:0 and {other}!|devices, {other} and cuda:0!"
    ):
        op(a, b)
    op(a, torch.ones(3, 3, device="cuda:0"))  # the same op on one device runs


def test_cross_device_error_is_a_runtime_error(sim: object) -> None:
    a = torch.ones(2, 3, device="cuda:0")
    b = torch.ones(3, 2, device="cuda:1")
    with pytest.raises(RuntimeError) as caught:
        a @ b
    assert isinstance(caught.value, devicekit.DevicekitError)


def test_cross_device_message(sim: object) -> None:
    a = torch.ones(2, 3, device="cuda:0")
    b = torch.ones(3)
    with pytest.raises(CrossDeviceError) as caught:
        torch.add(a, b)
    error = caught.value
    assert error.op == "torch.add"
    assert error.operands == (("input", "f32[2,3] @ cuda:0"), ("other", "f32[3] @ cpu"))
    assert error.devices == (CUDA0, torch.device("cpu"))
    assert error.location is not None
    assert error.location.endswith("torch.add(a, b)")
    lines = str(error).splitlines()
    assert lines.pop(0) == (
        "Expected all tensors to be on the same device, but found at least two devices, "
        "cuda:0 and cpu!"
    )
    assert lines[0] == "torch.add got tensors on different devices (cuda:0, cpu):"
    assert lines[1] == "  input: f32[2,3] @ cuda:0"
    assert lines[2] == "  other: f32[3] @ cpu"
    assert lines[3].startswith("    made by torch.ones at ")
    assert lines[4].startswith("called at ")
    assert lines[4].endswith("test_simulate.py:" + lines[4].split(":")[-2] + ": torch.add(a, b)")
    assert lines[5] == (
        "Fix: create it on the device where it is used: `torch.ones(..., device=a.device)`."
    )
    assert lines[6] == (
        "(Devices cuda:0 to cuda:1 are simulated on the CPU by devicekit.simulated_devices; "
        "real hardware raises here too.)"
    )


def test_cpu_scalars_mix_freely(sim: object) -> None:
    a = torch.ones(3, device="cuda:1")
    result = a * torch.tensor(2.0) + torch.tensor(1)
    assert result.device == CUDA1
    assert result.tolist() == [3.0, 3.0, 3.0]


def test_simulated_scalars_do_not_mix_across_devices(sim: object) -> None:
    with pytest.raises(CrossDeviceError):
        torch.ones(3, device="cuda:1") * torch.tensor(2.0, device="cuda:0")


def test_index_tensors_may_stay_on_the_cpu(sim: object) -> None:
    a = torch.arange(6.0, device="cuda:0")
    index = torch.tensor([0, 2])
    assert a[index].tolist() == [0.0, 2.0]
    assert a[index].device == CUDA0
    a[index] = torch.zeros(2)
    assert a.tolist() == [0.0, 1.0, 0.0, 3.0, 4.0, 5.0]
    mask = torch.tensor([True, False] * 3)
    assert a[mask].device == CUDA0


def test_copy_between_devices_is_allowed(sim: object) -> None:
    target = torch.zeros(3, device="cuda:0")
    target.copy_(torch.arange(3.0))
    target.copy_(torch.arange(3.0, device="cuda:1"))
    assert target.device == CUDA0
    assert target.tolist() == [0.0, 1.0, 2.0]
    host = torch.zeros(3)
    host.copy_(target)
    assert host.device == torch.device("cpu")


def test_assigning_a_grad_on_another_device_raises(sim: object) -> None:
    weight = torch.ones(2, device="cuda:0", requires_grad=True)
    with pytest.raises(CrossDeviceError, match=r"torch.Tensor.grad \(assignment\)"):
        weight.grad = torch.ones(2, device="cuda:1")


SLOTS = st.sampled_from(["cuda:0", "cuda:1", "cpu", "scalar"])
BINARY: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
    torch.add,
    torch.mul,
    torch.maximum,
    lambda a, b: a - b,
    lambda a, b: torch.where(a > b, a, b),
]


def _make(slot: str, values: torch.Tensor) -> torch.Tensor:
    if slot == "scalar":
        return values[0].clone()
    return values.to(slot)


@settings(max_examples=60)
@given(
    first=SLOTS,
    second=SLOTS,
    op=st.sampled_from(BINARY),
    values=st.lists(st.floats(-10, 10, width=32), min_size=3, max_size=3),
)
def test_raises_exactly_when_devices_differ(
    first: str,
    second: str,
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    values: list[float],
) -> None:
    a_values = torch.tensor(values)
    b_values = a_values.flip(0)
    on_cpu = [slot if slot == "scalar" else "cpu" for slot in (first, second)]
    expected = op(_make(on_cpu[0], a_values), _make(on_cpu[1], b_values))
    devices = {slot for slot in (first, second) if slot != "scalar"}
    with simulated_devices("cuda", 2):
        a, b = _make(first, a_values), _make(second, b_values)
        if len(devices) > 1:
            with pytest.raises(CrossDeviceError):
                op(a, b)
            return
        result = op(a, b)
        where = devices.pop() if devices else "cpu"
        assert result.device == torch.device(where)
        assert torch.equal(result.cpu(), expected)


# --- modules, autograd, optimizers --------------------------------------------------------------


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )
        self.register_buffer("scale", torch.full((2,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x) * self.scale
        return out


def _train(
    device: str, optimizer: type[torch.optim.Optimizer], steps: int = 4
) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Small().to(device)
    assert {p.device for p in model.parameters()} == {torch.device(device)}
    assert {b.device for b in model.buffers()} == {torch.device(device)}
    opt = optimizer(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(steps, 8, 4, generator=generator)
    targets = torch.randn(steps, 8, 2, generator=generator)
    losses = []
    for x, y in zip(inputs, targets, strict=True):
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        assert all(p.grad is not None and p.grad.device == x.device for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        evaluated = model.eval()(inputs[0].to(device))
    assert evaluated.device == torch.device(device)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return losses, state


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_training_gives_the_same_results_as_on_the_cpu(
    optimizer: type[torch.optim.Optimizer],
) -> None:
    expected_losses, expected_state = _train("cpu", optimizer)
    with simulated_devices("cuda", 2):
        losses, state = _train("cuda:1", optimizer)
    assert losses == expected_losses
    assert state.keys() == expected_state.keys()
    for key, value in state.items():
        assert torch.equal(value, expected_state[key]), key
        assert _TAG not in value.__dict__


def test_state_dict_round_trip_and_deepcopy(sim: object) -> None:
    torch.manual_seed(0)
    model = Small().cuda(1)
    state = model.state_dict()
    assert {value.device for value in state.values()} == {CUDA1}
    other = Small().to("cuda:0")
    other.load_state_dict(state)
    assert {p.device for p in other.parameters()} == {CUDA0}
    for key, value in other.state_dict().items():
        assert torch.equal(value.cpu(), state[key].cpu())
    clone = copy.deepcopy(other)
    assert {p.device for p in clone.parameters()} == {CUDA0}
    host = clone.to("cpu")
    assert all(type(p) is torch.nn.Parameter for p in host.parameters())
    assert {p.device for p in host.parameters()} == {torch.device("cpu")}


def test_optimizer_state_follows_parameters(sim: object) -> None:
    model = torch.nn.Linear(3, 1).to("cuda:1")
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3, device="cuda:1")).sum().backward()
    opt.step()
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert exp_avg.device == CUDA1


def test_a_model_split_over_two_devices_trains(sim: object) -> None:
    first = torch.nn.Linear(3, 4).to("cuda:0")
    second = torch.nn.Linear(4, 1).to("cuda:1")
    opt = torch.optim.Adam([*first.parameters(), *second.parameters()])
    hidden = first(torch.ones(2, 3, device="cuda:0"))
    with pytest.raises(CrossDeviceError):
        second(hidden)
    second(hidden.to("cuda:1")).sum().backward()
    opt.step()
    assert first.weight.device == CUDA0
    assert second.weight.device == CUDA1


def test_parameters_made_on_a_simulated_device(sim: object) -> None:
    layer = torch.nn.Linear(3, 2, device="cuda:1")
    assert layer.weight.device == CUDA1
    assert isinstance(layer.weight, torch.nn.Parameter)
    assert torch.nn.Parameter(torch.ones(1, device="cuda:0")).device == CUDA0


# --- torch.cuda and devicekit answer consistently -------------------------------------------------


def test_torch_cuda_answers_inside_and_is_restored() -> None:
    saved = {name: getattr(torch.cuda, name) for name in ("is_available", "device_count")}
    assert not torch.cuda.is_available()
    with simulated_devices("cuda", 3):
        assert torch.cuda.is_available()
        assert torch.cuda.device_count() == 3
        assert torch.accelerator.device_count() == 3
        assert torch.accelerator.current_accelerator() == torch.device("cuda")
        assert torch.cuda.current_device() == 0
        torch.cuda.set_device(2)
        assert torch.cuda.current_device() == 2
        assert torch.ones(1).cuda().device == torch.device("cuda", 2)
        assert torch.ones(1, device="cuda").device == torch.device("cuda", 2)
        with torch.cuda.device(1):
            assert torch.cuda.current_device() == 1
        assert torch.cuda.current_device() == 2
        torch.cuda.synchronize()
        torch.cuda.synchronize("cuda:1")
        assert torch.cuda.get_device_name(1) == "NVIDIA H100 80GB HBM3"
    assert not torch.cuda.is_available()
    assert torch.accelerator.current_accelerator(check_available=True) is None
    assert {name: getattr(torch.cuda, name) for name in saved} == saved


def test_streams_and_events_are_trivially_synchronous(sim: object) -> None:
    stream = torch.cuda.Stream()
    event = torch.cuda.Event()
    event.record(stream)
    event.synchronize()
    assert event.query()
    with torch.cuda.stream(stream):
        assert (torch.ones(2, device="cuda:1") * 2).tolist() == [2.0, 2.0]
    assert torch.cuda.current_stream().device == CUDA0
    assert torch.accelerator.current_stream("cuda:1").device == CUDA1
    generic = torch.Event(device="cuda:1")
    generic.record(torch.accelerator.current_stream("cuda:1"))
    generic.synchronize()
    assert type(torch.Event(device="cpu")) is not type(generic)


def test_torch_default_device_allocates_on_simulated_devices(sim: object) -> None:
    torch.set_default_device("cuda:1")
    try:
        assert torch.zeros(2).device == CUDA1
        assert torch.nn.Linear(2, 2).weight.device == CUDA1
        assert torch.get_default_device() == CUDA1
    finally:
        torch.set_default_device(None)
    with torch.device("cuda:0"):
        assert torch.ones(2).device == CUDA0
    assert torch.ones(2).device == torch.device("cpu")


def test_type_names_the_simulated_backend(sim: object) -> None:
    assert torch.ones(1, device="cuda:0").type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).type() == "torch.FloatTensor"
    assert torch.ones(1, device="cuda:0").type(torch.float64).device == CUDA0


@pytest.mark.parametrize("workers", [0, 1])
def test_data_loader_with_pinned_memory(sim: object, workers: int) -> None:
    data = torch.utils.data.TensorDataset(torch.arange(8.0).reshape(4, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=2, pin_memory=True, num_workers=workers)
    batches = [batch.to("cuda:1", non_blocking=True) for (batch,) in loader]
    assert [batch.device for batch in batches] == [CUDA1, CUDA1]
    assert torch.equal(torch.cat([batch.cpu() for batch in batches]), data.tensors[0])


def test_default_device_allocates_on_simulated_devices(sim: object) -> None:
    with devicekit.default_device("cuda:1"):
        assert torch.zeros(2).device == CUDA1
        assert torch.nn.Linear(2, 2).weight.device == CUDA1
        assert devicekit.current_device() == CUDA1
    assert torch.zeros(2).device == torch.device("cpu")


def test_everything_is_restored_after_an_exception() -> None:
    before = (torch.nn.Parameter.__dict__["__new__"], torch.accelerator.device_count)
    with pytest.raises(ZeroDivisionError), simulated_devices("cuda", 2):
        _ = 1 / 0
    after = (torch.nn.Parameter.__dict__["__new__"], torch.accelerator.device_count)
    assert after == before
    assert "pin_memory" not in torch.Tensor.__dict__  # torch's own, from TensorBase, again
    assert not torch.cuda.is_available()
    assert devicekit.devices()[-1].simulated is False
    with simulated_devices("cuda", 1):  # and a new block can start
        assert torch.cuda.device_count() == 1


def test_devicekit_lists_and_accepts_the_simulated_devices(sim: object) -> None:
    infos = devicekit.devices()
    assert [info.device for info in infos] == [torch.device("cpu"), CUDA0, CUDA1]
    assert [info.simulated for info in infos] == [False, True, True]
    assert str(infos[2]) == "cuda:1 | simulated cuda:1 | simulated"
    assert devicekit.as_device("cuda:1") == CUDA1
    assert devicekit.accelerator_type() == "cuda"
    assert devicekit.best_device().type == "cuda"


def test_out_of_range_device_is_refused(sim: object) -> None:
    with pytest.raises(SimulationError, match=r"provides only cuda:0 to cuda:1"):
        torch.ones(1, device="cuda:2")


def test_decorator_runs_each_call_in_a_fresh_block() -> None:
    @simulated_devices("cuda", 2)
    def count() -> int:
        return torch.cuda.device_count()

    assert count() == 2
    assert count() == 2
    assert not torch.cuda.is_available()


# Nested blocks (joining, pausing): tests/test_simulate_run.py.


def test_a_real_device_type_is_refused(fake_backend: Callable[..., object]) -> None:
    fake_backend("cuda", free_memory=[1])
    with pytest.raises(SimulationError, match=r"this machine really has cuda devices"):
        simulated_devices("cuda", 2).__enter__()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("tpu", 2), r"^simulated_devices\('tpu', 2\): cannot simulate 'tpu'\. Supported"),
        (("cuda", 0), r"^simulated_devices\('cuda', 0\): count must be an integer from 1 to 16"),
        (("cuda", True), r"count must be an integer from 1 to 16, got True\.$"),
        (("cuda", "2"), r"count must be an integer from 1 to 16, got '2'\.$"),
    ],
)
def test_bad_arguments_are_refused(args: tuple[str, int], match: str) -> None:
    # Bad arguments are a usage error (InvalidArgumentError), not a simulation failure.
    with pytest.raises(devicekit.InvalidArgumentError, match=match) as caught:
        simulated_devices(*args)
    assert not isinstance(caught.value, SimulationError)


# --- devicekit's own movers see the simulated devices ---------------------------------------


@pytest.mark.parametrize("non_blocking", ["auto", True, False])
def test_to_device_moves_batches_and_models(sim: object, non_blocking: bool | str) -> None:
    batch = {"x": torch.ones(2, 3), "ids": [torch.arange(3), "text"], "many": [torch.ones(2)] * 40}
    moved = devicekit.to_device(batch, "cuda:1", non_blocking=non_blocking)  # type: ignore[arg-type]
    assert devicekit.find_device(moved) == CUDA1
    assert set(devicekit.devices_of(moved)) == {CUDA1}
    assert moved["many"][0] is moved["many"][39]
    assert torch.equal(moved["x"].cpu(), batch["x"])
    model = devicekit.to_device(torch.nn.Linear(2, 2), "cuda:0")
    assert devicekit.find_device(model) == CUDA0
    back = devicekit.to_device(moved, "cpu")
    assert devicekit.find_device(back) == torch.device("cpu")
    assert _TAG not in back["x"].__dict__


def test_find_device_reports_mixed_simulated_devices(sim: object) -> None:
    batch = {"a": torch.ones(1, device="cuda:0"), "b": torch.ones(1, device="cuda:1")}
    with pytest.raises(devicekit.MixedDevicesError, match=r"cuda:0: batch\['a'\]; cuda:1"):
        devicekit.find_device(batch)


def test_to_device_without_a_device_uses_the_simulated_accelerator(sim: object) -> None:
    assert devicekit.to_device(torch.ones(1)).device == CUDA0


@settings(max_examples=25)
@given(batch=nested_batches(cycles=True))
def test_any_batch_moves_onto_a_simulated_device_and_back(batch: object) -> None:
    with simulated_devices("cuda", 2):
        before = devicekit.devices_of(batch)
        moved = devicekit.to_device(batch, "cuda:1")
        after = devicekit.devices_of(moved)
        assert set(after) <= {CUDA1}
        # (paths into sets name iteration positions, which differ between two sets)
        assert sum(map(len, after.values())) == sum(map(len, before.values()))
        back = devicekit.devices_of(devicekit.to_device(moved, "cpu"))
        assert set(back) <= {torch.device("cpu")}


@settings(max_examples=40)
@given(tensor=tensors(), where=st.sampled_from([CUDA0, CUDA1]))
@example(tensor=torch.ones(2, dtype=torch.bfloat16)[::2], where=CUDA0)  # one element, stride 2
@example(tensor=torch.tensor(1.5, dtype=torch.bfloat16), where=CUDA1)  # 0-dim
@example(tensor=torch.ones(0, 3, dtype=torch.bfloat16).mT, where=CUDA1)  # empty, transposed
def test_every_tensor_keeps_its_values_and_reports_its_device(
    tensor: torch.Tensor, where: torch.device
) -> None:
    with simulated_devices("cuda", 2):
        moved = tensor.to(where)
        assert (moved.device, moved.dtype, moved.shape) == (where, tensor.dtype, tensor.shape)
        assert moved.stride() == tensor.contiguous().stride() or not tensor.is_contiguous()
        back = moved.cpu()
    assert back.device == torch.device("cpu")
    if tensor.numel() > 0:  # compare bit by bit: works for every dtype
        dense = torch.contiguous_format
        as_bytes = back.reshape(-1).clone(memory_format=dense).view(torch.uint8)
        assert torch.equal(
            as_bytes, tensor.reshape(-1).clone(memory_format=dense).view(torch.uint8)
        )
