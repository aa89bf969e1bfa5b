"""What torch code sees of a simulated device: subclasses, wrapper subclasses, nested tensors,
vmap, TorchScript, gradcheck, the tensor methods CUDA answers differently, and the messages.

Each test here failed before the fix it names (issue 13 items 9 and 10, issue 14's foreach).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import CrossDeviceError, SimulationError, simulated_devices
from tests.machine import REAL_CUDA

pytestmark = pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)
SAME_DEVICE = "Expected all tensors to be on the same device, but found at least two devices, "


@pytest.fixture
def sim() -> Iterator[list[torch.device]]:
    with simulated_devices("cuda", 2) as made:
        yield made


# --- subclasses: their __torch_function__ runs under the simulation ---------------------------


class Logged(torch.Tensor):
    """A subclass with a `__torch_function__` of its own, as TensorDict and EdgeIndex have."""

    calls: list[str] = []  # noqa: RUF012 - shared log, cleared by each test

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        cls.calls.append(getattr(func, "__name__", "?"))
        return super().__torch_function__(func, types, args, kwargs or {})


class Plain(torch.Tensor):
    pass


class Wrapper(torch.Tensor):
    """A wrapper subclass: the wrapper's device is whatever its inner tensor says."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> Wrapper:
        made = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.shape, dtype=elem.dtype, device=elem.device
        )
        made.elem = elem
        return made  # type: ignore[no-any-return]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap(value: Any) -> Any:
            return value.elem if isinstance(value, Wrapper) else value

        out = func(*map(unwrap, args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})
        return Wrapper(out) if isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("kind", [Logged, Plain])
def test_a_torch_function_subclass_keeps_its_device_and_is_checked(
    sim: object, kind: type[torch.Tensor]
) -> None:
    Logged.calls = []
    s = torch.arange(3.0, device="cuda:1").as_subclass(kind)
    assert type(s) is kind
    assert s.device == CUDA1
    y = s * 2 + 1
    assert type(y) is kind
    assert y.device == CUDA1
    assert y.tolist() == [1.0, 3.0, 5.0]
    if kind is Logged:
        assert {"mul", "add"} <= set(Logged.calls)  # its handler ran
    with pytest.raises(CrossDeviceError, match=r"found at least two devices, cuda:1 and cuda:0"):
        torch.add(s, torch.ones(3, device="cuda:0"))


def test_a_parameter_subclass_stays_on_its_device(sim: object) -> None:
    class Tied(torch.nn.Parameter):
        pass

    p = Tied(torch.ones(2, device="cuda:1"))
    assert p.device == CUDA1
    assert (p * 3).device == CUDA1
    with pytest.raises(CrossDeviceError):
        p + torch.ones(2, device="cuda:0")


def test_a_wrapper_subclass_gets_the_simulated_device(sim: object) -> None:
    w = Wrapper(torch.arange(3.0, device="cuda:1"))
    assert w.device == CUDA1
    y = w * 2
    assert isinstance(y, Wrapper)
    assert y.device == CUDA1
    assert y.elem.tolist() == [0.0, 2.0, 4.0]
    with pytest.raises(CrossDeviceError, match=r"cuda:1 and cuda:0"):
        w + Wrapper(torch.ones(3, device="cuda:0"))


def test_a_wrapper_subclass_made_outside_is_a_plain_cpu_tensor() -> None:
    assert Wrapper(torch.ones(2)).device == torch.device("cpu")


@pytest.mark.parametrize("after_tensordict", [False, True])
def test_vmap_keeps_the_device_and_checks(after_tensordict: bool) -> None:
    if after_tensordict:  # TensorDict replaces vmap's entry and exit with its own on import
        pytest.importorskip("tensordict.nn")
    with simulated_devices("cuda", 2):
        check_vmap()


def check_vmap() -> None:
    x = torch.arange(6.0, device="cuda:1").reshape(3, 2)
    y = torch.vmap(lambda row: row * 2)(x)
    assert y.device == CUDA1
    assert torch.equal(y.cpu(), torch.arange(6.0).reshape(3, 2) * 2)
    other = torch.ones(2, device="cuda:0")
    with pytest.raises(CrossDeviceError):
        torch.vmap(lambda row: row + other)(x)


def test_tensordict_keeps_devices_and_catches_mixing(sim: object) -> None:
    tensordict = pytest.importorskip("tensordict")
    td = tensordict.TensorDict(
        {"a": torch.arange(3.0, device="cuda:1")}, batch_size=[3], device="cuda:1"
    )
    assert (td + 1)["a"].device == CUDA1
    stacked = torch.stack([td, td])
    assert stacked["a"].device == CUDA1
    assert stacked["a"].tolist() == [[0.0, 1.0, 2.0]] * 2
    elsewhere = tensordict.TensorDict(
        {"a": torch.ones(3, device="cuda:0")}, batch_size=[3], device="cuda:0"
    )
    with pytest.raises(CrossDeviceError):
        td + elsewhere


def test_torch_geometric_edge_index_keeps_devices_and_catches_mixing(sim: object) -> None:
    pyg = pytest.importorskip("torch_geometric")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pyg's sparse-tensor beta warnings
        edges = pyg.EdgeIndex(
            torch.tensor([[0, 1], [1, 0]], device="cuda:1"), sparse_size=(2, 2), sort_order="row"
        )
        assert edges.device == CUDA1
        out = edges.matmul(torch.ones(2, 2, device="cuda:1"))
        out = out[0] if isinstance(out, tuple) else out
        assert out.device == CUDA1
        assert out.cpu().tolist() == [[1.0, 1.0], [1.0, 1.0]]
        with pytest.raises(CrossDeviceError):
            edges.matmul(torch.ones(2, 2, device="cuda:0"))


def test_torch_geometric_caches_live_with_their_edge_index(sim: object, tmp_path: Any) -> None:
    """`EdgeIndex` fills caches in its `__torch_dispatch__` (below the mode) and moves them with
    itself; on a GPU they live where it does, also after a checkpoint round trip."""
    pyg = pytest.importorskip("torch_geometric")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pyg's sparse-tensor beta warnings
        adj = pyg.EdgeIndex([[0, 1, 1, 2], [1, 0, 2, 1]], sort_order="row").fill_cache_()
        adj = adj.to("cuda:1")
        assert adj._indptr.device == CUDA1
        fresh = pyg.EdgeIndex([[0, 1, 1, 2], [1, 0, 2, 1]], sort_order="row", device="cuda:0")
        x = torch.ones(3, 1, device="cuda:0")
        with devicekit.device_guard("error"):
            first, second = fresh @ x, fresh.matmul(x)  # the second reads the caches
        assert fresh._indptr.device == CUDA0
        assert torch.equal(first.cpu(), second.cpu())
        torch.save(adj, tmp_path / "adj.pt")
        loaded = torch.load(tmp_path / "adj.pt", weights_only=False)
        assert type(loaded) is type(adj)
        assert loaded.device == CUDA1
        assert loaded._indptr.device == CUDA1
        assert loaded.equal(adj)


# --- nested (jagged) tensors -------------------------------------------------------------------


def jagged(device: str | None = None) -> torch.Tensor:
    return torch.nested.nested_tensor(
        [torch.ones(2, 3), torch.arange(12.0).reshape(4, 3)], layout=torch.jagged, device=device
    )


def test_nested_tensors_on_a_simulated_device(sim: object) -> None:
    nt = jagged("cuda:1")
    assert nt.device == CUDA1
    y = (nt * 2).sin()
    assert y.device == CUDA1
    expected = (jagged() * 2).sin()
    assert all(torch.equal(a.cpu(), b) for a, b in zip(y.unbind(), expected.unbind(), strict=True))


def test_nested_tensors_are_no_false_alarm_under_the_guard() -> None:
    with devicekit.device_guard("error"):
        y = (jagged() * 2).sin()
    assert y.device == torch.device("cpu")


# --- tensor methods CUDA answers differently -----------------------------------------------------


def test_simulated_tensors_are_shared_like_cuda_tensors(sim: object) -> None:
    x = torch.ones(2, device="cuda:1")
    assert x.is_shared()
    assert x.share_memory_() is x
    assert x.device == CUDA1
    assert not torch.ones(2).is_shared()


def test_pin_memory_of_a_simulated_tensor_is_refused_like_cuda(sim: object) -> None:
    with pytest.raises(
        RuntimeError,
        match=r"^cannot pin 'torch\.cuda\.FloatTensor' only dense CPU tensors can be pinned",
    ):
        torch.ones(2, device="cuda:0").pin_memory()


def test_pinned_copies_say_they_are_pinned(sim: object) -> None:
    source = torch.arange(3.0)
    pinned = source.pin_memory()
    assert pinned.is_pinned()
    assert not source.is_pinned()
    assert pinned.pin_memory() is pinned
    assert torch.empty(3, pin_memory=True).is_pinned()
    moved = pinned.to("cuda:1", non_blocking=True)
    assert moved.device == CUDA1
    assert moved.tolist() == [0.0, 1.0, 2.0]


def test_numpy_conversion_is_refused_like_cuda(sim: object) -> None:
    message = (
        r"^can't convert cuda:1 device type tensor to numpy\. Use Tensor\.cpu\(\) to copy the "
        r"tensor to host memory first\.$"
    )
    with pytest.raises(TypeError, match=message):
        np.asarray(torch.ones(2, device="cuda:1"))
    assert np.asarray(torch.ones(2, device="cuda:1").cpu()).tolist() == [1.0, 1.0]


def test_device_none_means_no_device(sim: object) -> None:
    x = torch.ones(2, device="cuda:1")
    assert x.new_zeros(3, device=None).device == CUDA1
    assert torch.zeros_like(x, device=None).device == CUDA1
    assert torch.zeros(3, device=None).device == torch.device("cpu")


def test_an_integer_index_names_the_simulated_type(sim: object) -> None:
    model = torch.nn.Linear(2, 2).to(0)
    assert model.weight.device == CUDA0
    assert torch.nn.Linear(2, 2).to(device=1).weight.device == CUDA1
    assert torch.ones(2).to(1).device == CUDA1


def test_lazy_modules_move_inside_the_block(sim: object) -> None:
    cpu_module = torch.nn.LazyLinear(3).to("cpu")
    assert cpu_module(torch.ones(2, 4)).device == torch.device("cpu")
    module = torch.nn.LazyLinear(3).cuda(1)
    assert module(torch.ones(2, 4, device="cuda:1")).device == CUDA1
    assert module.weight.device == CUDA1


@pytest.mark.parametrize(
    "value", [lambda: torch.tensor(5.0, device="cuda:0"), lambda: torch.ones(3, device="cuda:0")]
)
def test_assigning_into_a_cpu_tensor_copies(sim: object, value: Any) -> None:
    target = torch.zeros(2, 3)
    target[1] = value()  # a view, then copy_: legal from any device, as on CUDA
    assert target[1].tolist() == [5.0] * 3 if value().dim() == 0 else [1.0] * 3
    assert target.device == torch.device("cpu")


def test_assigning_a_cuda_scalar_by_index_is_no_false_alarm(sim: object) -> None:
    vector = torch.zeros(3)
    vector[1] = torch.tensor(5.0, device="cuda:0")
    with devicekit.device_guard("error"):
        vector[2] = torch.tensor(7.0, device="cuda:1")
    assert vector.tolist() == [0.0, 5.0, 7.0]


def test_advanced_index_assignment_across_devices_still_raises(sim: object) -> None:
    target = torch.zeros(3)
    with pytest.raises(CrossDeviceError):
        target[torch.tensor([0, 1])] = torch.ones(2, device="cuda:0")


# --- autograd, TorchScript, warnings -----------------------------------------------------------


def test_gradcheck_on_simulated_inputs(sim: object) -> None:
    x = torch.randn(3, dtype=torch.double, device="cuda:1", requires_grad=True)
    assert torch.autograd.gradcheck(torch.sin, (x,))
    undefined = torch._C._functions.UndefinedGrad()(torch.sin(x))
    assert undefined.device == CUDA1


def scripted(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x * 2 + y, x


def script(obj: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        return torch.jit.script(obj)


def test_torchscript_results_keep_the_device() -> None:
    function, module = script(scripted), script(torch.nn.Linear(2, 2))  # made before the block
    with simulated_devices("cuda", 2):
        check_torchscript(function, module)


def check_torchscript(scripted: Any, module: Any) -> None:
    a = torch.ones(2, device="cuda:1")
    added, same = scripted(a, a)
    assert (added.device, same.device) == (CUDA1, CUDA1)
    assert added.tolist() == [3.0, 3.0]
    different = r"\nTorchScript scripted got tensors on different devices"
    with pytest.raises(CrossDeviceError, match=different):
        scripted(a, torch.ones(2, device="cuda:0"))
    assert module(torch.ones(2, device="cuda:1")).device == CUDA1


def test_warnings_name_the_calling_line(sim: object) -> None:
    x = torch.ones(2, device="cuda:0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.tensor(x)  # UserWarning: To copy construct from a tensor ...
    assert caught, "torch warned nothing"
    assert caught[0].filename == __file__
    assert caught[0].lineno == test_warnings_name_the_calling_line.__code__.co_firstlineno + 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module=__name__)
        with pytest.raises(UserWarning, match="To copy construct from a tensor"):
            torch.tensor(x)
        with pytest.raises(UserWarning, match="To copy construct from a tensor"):
            torch.tensor(x, device="cuda:1")  # a factory call


# --- messages ----------------------------------------------------------------------------------


def test_cross_device_errors_start_with_torchs_sentence(sim: object) -> None:
    with pytest.raises(CrossDeviceError) as caught:
        torch.ones(2, device="cuda:0") + torch.ones(2, device="cuda:1")
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{SAME_DEVICE}cuda:0 and cuda:1!"
    assert lines[1] == "Tensor.__add__ got tensors on different devices (cuda:0, cuda:1):"


def test_guard_errors_start_with_torchs_sentence() -> None:
    with devicekit.device_guard(), pytest.raises(CrossDeviceError) as caught:
        torch.ones(2) + torch.ones(2, device="meta")
    assert str(caught.value).splitlines()[0] == f"{SAME_DEVICE}cpu and meta!"


def test_one_simulated_device_is_named_once() -> None:
    with simulated_devices("cuda", 1), pytest.raises(CrossDeviceError) as caught:
        torch.ones(2, device="cuda") + torch.ones(2)
    assert str(caught.value).splitlines()[-1] == (
        "(Device cuda:0 is simulated on the CPU by devicekit.simulated_devices; real hardware "
        "raises here too.)"
    )


# --- foreach ops group by device, as CUDA does (issue 14) --------------------------------------


def two_device_parameters() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    first = torch.nn.Parameter(torch.randn(3, device="cuda:0"))
    second = torch.nn.Parameter(torch.randn(3, device="cuda:1"))
    (first.sum() + second.sum().to("cuda:0")).backward()
    return [first, second]


def test_clip_grad_norm_and_adam_over_two_devices_under_the_guard(sim: object) -> None:
    expected = two_device_parameters()
    torch.nn.utils.clip_grad_norm_(expected, 1.0, foreach=False)
    torch.optim.Adam(expected, foreach=False).step()
    params = two_device_parameters()
    with devicekit.device_guard("error"):
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        torch.optim.Adam(params, foreach=True).step()
    assert norm.device == CUDA0
    for got, want in zip(params, expected, strict=True):
        assert got.device == want.device
        assert torch.equal(got.detach().cpu(), want.detach().cpu())


def test_foreach_mixing_at_one_position_still_raises_under_the_guard(sim: object) -> None:
    first = [torch.ones(2, device="cuda:0"), torch.ones(2, device="cuda:1")]
    second = [torch.ones(2, device="cuda:1"), torch.ones(2, device="cuda:1")]
    with devicekit.device_guard("error"), pytest.raises(CrossDeviceError) as caught:
        torch._foreach_add(first, second)
    assert caught.value.devices == (CUDA0, CUDA1)
    assert [label for label, _ in caught.value.operands] == ["argument 0[0]", "argument 1[0]"]


@settings(max_examples=30, deadline=None)
@given(
    devices=st.lists(st.sampled_from(["cuda:0", "cuda:1"]), min_size=1, max_size=4),
    moved=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_foreach_raises_exactly_when_a_position_mixes(
    devices: list[str], moved: list[bool]
) -> None:
    with simulated_devices("cuda", 2), devicekit.device_guard("error"):
        first = [torch.full((2,), 1.0, device=device) for device in devices]
        other = [
            "cuda:1" if flip and device == "cuda:0" else "cuda:0" if flip else device
            for device, flip in zip(devices, moved, strict=False)
        ]
        second = [torch.full((2,), 2.0, device=device) for device in other]
        if devices == other:
            result = torch._foreach_add(first, second)
            assert [str(t.device) for t in result] == devices
            assert all(t.tolist() == [3.0, 3.0] for t in result)
        else:
            with pytest.raises(CrossDeviceError):
                torch._foreach_add(first, second)


@settings(max_examples=30, deadline=None)
@given(
    left=st.sampled_from(["cuda:0", "cuda:1", "cpu"]),
    right=st.sampled_from(["cuda:0", "cuda:1", "cpu"]),
    op=st.sampled_from([torch.add, torch.mul, torch.maximum]),
)
def test_through_a_subclass_as_through_plain_tensors(left: str, right: str, op: Any) -> None:
    """A subclass with its own `__torch_function__` gets the same devices, errors and values as
    plain tensors."""
    with simulated_devices("cuda", 2):
        a, b = torch.arange(3.0, device=left), torch.full((3,), 2.0, device=right)
        try:
            plain: torch.Tensor | None = op(a, b)
        except CrossDeviceError:
            plain = None
        try:
            through: torch.Tensor | None = op(a.as_subclass(Logged), b)
        except CrossDeviceError:
            through = None
        assert (plain is None) == (through is None) == (left != right)
        if plain is not None and through is not None:
            assert through.device == plain.device
            assert torch.equal(through.as_subclass(torch.Tensor).cpu(), plain.cpu())


# --- the fast path: CPU ops under a simulation -------------------------------------------------


def test_cpu_ops_under_a_simulation_skip_the_handlers(
    sim: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU test under a run-wide simulation: ops on ordinary tensors that name no simulated
    device run as they are (issue 14's speed target), the rest still reach the handlers."""
    from devicekit import _simulate_mode

    handled: list[str] = []
    real_op = _simulate_mode._op

    def counting_op(func: Any, name: str, *rest: Any) -> Any:
        handled.append(name)
        return real_op(func, name, *rest)

    monkeypatch.setattr(_simulate_mode, "_op", counting_op)
    a, b = torch.ones(3), torch.ones(3)
    assert torch.add(a, b).tolist() == [2.0, 2.0, 2.0]
    assert (a * 2).sum(dim=0).item() == 6.0
    assert torch.cat([a, b]).device.type == "cpu"
    assert a.to(torch.float64).to("cpu").to(torch.device("cpu")).dtype == torch.float64
    assert torch.zeros(2, device="cpu").device.type == "cpu"
    assert handled == []
    assert (torch.ones(2, device="cuda:1") + 1).device == CUDA1  # a simulated operand
    assert handled == ["add"]
    assert a.to(1).device == CUDA1  # a bare index names a device
    assert a.to("cuda").device == CUDA0
    assert a.cuda(1).device == CUDA1
    assert torch.zeros(2, device="cuda:1").device == CUDA1
    with torch.device("cuda:1"):  # torch's default device applies to factories
        assert torch.zeros(2).device == CUDA1
    with pytest.raises(CrossDeviceError):
        torch.cat([a, torch.ones(3, device="cuda:0")])  # a simulated tensor inside a list


def test_warnings_of_cpu_ops_name_the_calling_line(sim: object) -> None:
    x = torch.ones(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.tensor(x), torch.tensor(x, dtype=torch.float64)  # two calls on one line
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, caught[0].lineno)] * 2
    first = test_warnings_of_cpu_ops_name_the_calling_line.__code__.co_firstlineno
    assert caught[0].lineno == first + 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=UserWarning, module=__name__)
        with pytest.raises(UserWarning, match="To copy construct from a tensor"):
            torch.tensor(x)


def test_a_bare_index_names_the_simulated_type(sim: object) -> None:
    """`torch.device(0)` means the machine's accelerator: the simulated one (issue 13)."""
    assert (torch.device(0), torch.device(1)) == (CUDA0, CUDA1)
    assert torch.ones(2).to(torch.device(1)).device == CUDA1
    assert torch.device("cpu").type == "cpu"
    with pytest.raises(SimulationError, match="provides only cuda:0 to cuda:1"):
        torch.ones(2, device=torch.device(2))


def test_a_nested_tensor_moved_to_the_cpu_has_its_own_offsets(sim: object) -> None:
    """torch's move of a jagged nested tensor hands its (CPU) offsets over as they are: the CPU
    copy gets untagged copies of them, with the same nested size, as a move off a GPU does
    (tensordict's `consolidate(filename=...)` of nested tensors gave back simulated values)."""
    nested = torch.nested.nested_tensor(
        [torch.ones(2, 3), torch.ones(4, 3)], layout=torch.jagged, device="cuda:1"
    )
    for moved in (nested.to("cpu"), nested.cpu()):
        assert (moved.device, moved._values.device, moved._offsets.device) == (
            torch.device("cpu"),
        ) * 3
        assert moved._offsets is not nested._offsets
        assert moved.shape == nested.shape  # the same nested int
        assert nested._offsets.device == CUDA1
        assert torch.equal(moved._values, torch.ones(6, 3))
    assert (nested.to("cpu") + nested.cpu()).shape == nested.shape


CPU_OPS = {
    "add": lambda a, b: torch.add(a, b),
    "mul operator": lambda a, b: a * b,
    "cat": lambda a, b: torch.cat([a, b]),
    "stack then sum": lambda a, b: torch.stack((a, b)).sum(dim=0),
    "where": lambda a, b: torch.where(a > 0, a, b),
    "to float64": lambda a, b: a.to(torch.float64) + b.to("cpu"),
    "index": lambda a, b: a[torch.tensor([0])] + b[0],
    "zeros like": lambda a, b: torch.zeros_like(a, device="cpu") + b,
}


@settings(max_examples=30, deadline=None)
@given(
    op=st.sampled_from(sorted(CPU_OPS)),
    values=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=5),
)
def test_cpu_ops_give_the_same_results_in_a_simulation(op: str, values: list[float]) -> None:
    """The fast path changes nothing but the cost: ordinary CPU tensors in, the same ordinary
    CPU tensors out, as without a simulation."""
    a, b = torch.tensor(values), torch.tensor(values[::-1])
    expected = CPU_OPS[op](a, b)
    with simulated_devices("cuda", 2):
        got = CPU_OPS[op](a, b)
        assert got.device == torch.device("cpu")
        assert not got.is_cuda
    assert "_devicekit_simulated_device" not in got.__dict__
    assert torch.equal(got, expected)


def test_foreach_copy_between_devices_is_a_copy_as_on_cuda() -> None:
    # CUDA runs `_foreach_copy_` position by position as `copy_`, which may cross devices.
    with simulated_devices("cuda", 2):
        destinations = [torch.zeros(3, device="cuda:0"), torch.zeros(2, device="cuda:1")]
        torch._foreach_copy_(destinations, [torch.ones(3), torch.full((2,), 2.0, device="cuda:0")])
        assert [str(t.device) for t in destinations] == ["cuda:0", "cuda:1"]
        assert destinations[0].tolist() == [1.0, 1.0, 1.0]
        assert destinations[1].tolist() == [2.0, 2.0]
