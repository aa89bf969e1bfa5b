from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import devicekit
from devicekit import (
    CrossDeviceError,
    DeviceMismatchWarning,
    DeviceMoveWarning,
    _context,
    _guard,
    device_guard,
)
from tests.machine import REAL_CUDA

CUDA = REAL_CUDA
DEVICES = ["cpu", "meta", *(["cuda:0"] if CUDA else [])]


def stack_depth() -> int:
    return torch._C._len_torch_function_stack()


@pytest.fixture(autouse=True)
def _no_mode_left_behind() -> Iterator[None]:
    before = stack_depth()
    yield
    assert stack_depth() == before
    assert _guard._ACTIVE_GUARD.get() is None


def cpu(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(*shape, dtype=dtype)


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.ones(*shape, dtype=dtype, device="meta")


def index(*values: int, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(values, device=device)


# The 12 ops torch 2.13 runs on a cpu and a meta tensor without complaint (`cpu @ meta` even
# returns garbage). Each is a regression test: the guard must raise before the op runs.
SILENT_OPS: dict[str, Callable[[], object]] = {
    "mm": lambda: torch.mm(cpu(2, 3), meta(3, 4)),
    "matmul operator": lambda: cpu(2, 3) @ meta(3, 4),
    "addmm": lambda: torch.addmm(meta(4), cpu(2, 3), meta(3, 4)),
    "linear": lambda: F.linear(cpu(2, 3), meta(4, 3)),
    "embedding": lambda: F.embedding(index(0, 1), meta(5, 3)),
    "index_select": lambda: torch.index_select(cpu(5, 3), 0, index(1, device="meta")),
    "getitem": lambda: cpu(5, 3)[index(1, 2, device="meta")],
    "gather": lambda: torch.gather(cpu(2, 3), 1, index(0, 1, device="meta").view(2, 1)),
    "scatter_add": lambda: cpu(2, 3).scatter_add(
        0, index(0, 1, device="meta").view(2, 1), meta(2, 1)
    ),
    "conv2d": lambda: F.conv2d(cpu(1, 2, 5, 5), meta(3, 2, 3, 3)),
    "einsum": lambda: torch.einsum("ij,jk->ik", cpu(2, 3), meta(3, 4)),
    "bmm": lambda: torch.bmm(cpu(2, 2, 3), meta(2, 3, 4)),
}


class TestError:
    @pytest.mark.parametrize("op", SILENT_OPS.values(), ids=SILENT_OPS.keys())
    def test_ops_torch_leaves_unchecked(self, op: Callable[[], object]) -> None:
        with device_guard(), pytest.raises(CrossDeviceError) as info:
            op()
        assert {str(d) for d in info.value.devices} == {"cpu", "meta"}

    def test_raises_before_the_op_runs(self) -> None:
        target = cpu(2)
        with device_guard(), pytest.raises(CrossDeviceError):
            target.add_(meta(2))
        assert target.tolist() == [1.0, 1.0]

    def test_is_a_runtime_error_with_structured_attributes(self) -> None:
        with device_guard(), pytest.raises(RuntimeError) as info:
            F.linear(cpu(8, 4), meta(3, 4), meta(3))
        error = info.value
        assert isinstance(error, CrossDeviceError)
        assert isinstance(error, devicekit.DevicekitError)
        assert error.op == "torch.nn.functional.linear"
        assert error.operands == (
            ("input", "f32[8,4] @ cpu"),
            ("weight", "f32[3,4] @ meta"),
            ("bias", "f32[3] @ meta"),
        )
        assert error.devices == (torch.device("cpu"), torch.device("meta"))
        assert error.location is not None
        assert error.location.endswith("F.linear(cpu(8, 4), meta(3, 4), meta(3))")

    def test_tensors_nested_in_lists_and_keywords(self) -> None:
        with device_guard():
            with pytest.raises(CrossDeviceError, match=r"tensors\[2\]: f32\[2\] @ meta"):
                torch.cat([cpu(2), cpu(2), meta(2)])
            with pytest.raises(CrossDeviceError, match=r"out: f32\[2\] @ meta"):
                torch.add(cpu(2), cpu(2), out=meta(2))

    def test_methods_and_operators(self) -> None:
        with device_guard():
            with pytest.raises(CrossDeviceError, match=r"\nTensor\.__add__ got"):
                cpu(2) + meta(2)
            with pytest.raises(CrossDeviceError, match=r"\nTensor\.mul got"):
                cpu(2).mul(meta(2))
            with pytest.raises(CrossDeviceError, match=r"\nTensor\.__getitem__ got"):
                cpu(2)[index(0, device="meta")]

    def test_cpu_scalars_mix_freely(self) -> None:
        with device_guard():
            assert (meta(3) * torch.tensor(2.0)).device.type == "meta"
            assert torch.where(meta(3) > 0, meta(3), torch.tensor(0.0)).device.type == "meta"
            with pytest.raises(CrossDeviceError):
                cpu(3) * torch.tensor(2.0, device="meta")  # only CPU scalars are exempt

    def test_same_device_ops_run_unchanged(self) -> None:
        with device_guard():
            result = torch.cat([cpu(2), cpu(2)]) @ cpu(4, 3)
        assert result.tolist() == [4.0, 4.0, 4.0]

    def test_explicit_transfers_are_allowed(self) -> None:
        model = torch.nn.Linear(3, 2)
        with device_guard():
            assert cpu(2).to("meta").device.type == "meta"
            assert cpu(2).to(meta(1)).device.type == "meta"
            target = cpu(2)
            target.copy_(torch.full((2,), 5.0))
            model.to("meta")
            assert model.weight.device.type == "meta"
            assert torch.as_tensor(cpu(2), device="meta").device.type == "meta"
            restored = torch.nn.Linear(3, 2, device="meta")
            restored.load_state_dict(torch.nn.Linear(3, 2).state_dict(), assign=True)
            batch = {"x": cpu(2, 3), "parts": [cpu(2), meta(2), torch.tensor(1.0)]}
            moved = devicekit.to_device(batch, "meta")
            assert list(devicekit.devices_of(moved)) == [torch.device("meta")]
        assert target.tolist() == [5.0, 5.0]


class TestIndexing:
    def test_cpu_indices_into_any_device(self) -> None:
        with device_guard():
            assert meta(5, 3)[index(1, 2)].shape == (2, 3)
            assert meta(5, 3)[index(1), index(2)].shape == (1,)
            assert meta(5, 3)[index(1, 2, device="meta")].device.type == "meta"
            assert cpu(5, 3)[index(1, 2)].shape == (2, 3)

    def test_indices_on_another_device(self) -> None:
        with device_guard(), pytest.raises(CrossDeviceError, match=r"key\[1\]: i64\[1\] @ meta"):
            cpu(5, 3)[index(1), index(2, device="meta")]

    def test_assignment_copies_the_value_from_anywhere(self) -> None:
        target = cpu(3)
        with device_guard():
            target[index(0, 1)] = torch.zeros(2)
            meta(3)[index(0)] = cpu(1)
        assert target.tolist() == [0.0, 0.0, 1.0]


def combine(*args: Any, **kwargs: Any) -> str:
    """An op that torch function modes see with exactly the arguments it was given."""
    found = [
        item
        for value in (*args, *kwargs.values())
        for item in (value if isinstance(value, list | tuple) else (value,))
        if isinstance(item, torch.Tensor)
    ]
    if torch.overrides.has_torch_function(found):
        result: str = torch.overrides.handle_torch_function(combine, found, *args, **kwargs)
        return result
    return "ran"


class ElsewhereTensor(torch.Tensor):
    """A tensor subclass that answers `.device` itself, whatever its storage says."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("meta")


class TestEveryOperandIsCompared:
    """The check takes shortcuts (`.is_cpu` first, the first tensor read last, one pass): each
    way a second device can turn up must still be caught."""

    @pytest.mark.parametrize(
        ("args", "kwargs"),
        [
            ((cpu(2), meta(2)), {}),
            ((meta(2), cpu(2)), {}),
            ((cpu(2), cpu(2), meta(2)), {}),
            ((meta(2), meta(2), cpu(2)), {}),
            ((meta(2), torch.tensor(1.0), cpu(2)), {}),
            ((cpu(2), 3, None, torch.Size([2]), meta(2)), {}),
            (([cpu(2), cpu(2), meta(2)],), {}),
            (([meta(2), torch.tensor(1.0)], cpu(2)), {}),
            ((cpu(2),), {"other": meta(2)}),
            ((cpu(2), cpu(2)), {"out": meta(2)}),
            ((meta(2), meta(2)), {"alpha": 2, "out": cpu(2)}),
            ((meta(2), [meta(2)]), {"out": [meta(2), cpu(2)]}),
            ((), {"tensors": (meta(2), cpu(2))}),
            ((torch.nn.Parameter(cpu(2)), torch.nn.Parameter(meta(2))), {}),
            ((cpu(2), torch.nn.Parameter(cpu(2)), torch.nn.Parameter(meta(2))), {}),
        ],
    )
    def test_a_second_device_anywhere_raises(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        with device_guard(), pytest.raises(CrossDeviceError, match="got tensors on different"):
            combine(*args, **kwargs)

    @pytest.mark.parametrize(
        ("args", "kwargs"),
        [
            ((cpu(2), cpu(2), torch.tensor(1.0)), {}),
            ((meta(2), torch.tensor(1.0), meta(2)), {}),
            (([meta(2), torch.tensor(1.0), meta(2)],), {"alpha": torch.tensor(2.0)}),
            ((torch.tensor(1.0), meta(2)), {"out": meta(2)}),
            ((meta(2), meta(2)), {"alpha": 2, "out": meta(2)}),
            ((cpu(2), cpu(2)), {"alpha": 2, "out": (cpu(2), torch.tensor(1.0))}),
            ((cpu(2), torch.nn.Parameter(cpu(2))), {"dims": torch.Size([1, 2])}),
        ],
    )
    def test_one_device_and_cpu_scalars_run(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        with device_guard():
            assert combine(*args, **kwargs) == "ran"

    def test_a_parameter_on_another_device(self) -> None:
        layer = torch.nn.Linear(3, 2, device="meta")
        with device_guard(), pytest.raises(CrossDeviceError, match=r"weight: f32\[2,3\] @ meta"):
            layer(cpu(4, 3))

    def test_a_subclass_is_asked_for_its_device(self) -> None:
        elsewhere = cpu(2).as_subclass(ElsewhereTensor)
        assert elsewhere.is_cpu
        assert elsewhere.device.type == "meta"
        with device_guard(), pytest.raises(CrossDeviceError, match="cpu, meta"):
            combine(cpu(2), elsewhere)
        with device_guard(), pytest.raises(CrossDeviceError, match="meta, cpu"):
            combine([elsewhere, cpu(2)])

    @pytest.mark.skipif(CUDA, reason="simulated CUDA devices need a machine without CUDA")
    @pytest.mark.parametrize(
        "devices",
        [
            ("cuda:0", "cuda:1"),
            ("cuda:1", "cuda:1", "cuda:0"),
            ("cpu", "cuda:0"),
            ("cuda:0", "cpu"),
            ("cpu", "cpu", "cuda:1"),
        ],
    )
    def test_simulated_devices_are_believed(self, devices: tuple[str, ...]) -> None:
        with devicekit.simulated_devices("cuda", 2):
            operands = [cpu(2).to(device) for device in devices]
            with device_guard(), pytest.raises(CrossDeviceError, match="got tensors on"):
                combine(*operands)
            with device_guard(), pytest.raises(CrossDeviceError, match="got tensors on"):
                combine(operands)
            with device_guard():
                assert combine(*[cpu(2).to(devices[0]) for _ in devices]) == "ran"


class TestWarn:
    def test_once_per_call_site_and_the_op_runs(self) -> None:
        with warnings.catch_warnings(record=True) as record, device_guard("warn"):
            warnings.simplefilter("always")
            results = [cpu(2, 3) @ meta(3, 4) for _ in range(3)]
            other = torch.mm(cpu(2, 3), meta(3, 4))
        assert all(r.category is DeviceMismatchWarning for r in record)
        assert [r.lineno for r in record] == [
            record[0].lineno,
            record[0].lineno + 1,
        ]
        assert all(r.filename == __file__ for r in record)
        assert [tuple(r.shape) for r in results] == [(2, 4)] * 3
        assert other.shape == (2, 4)

    def test_torch_errors_pass_through(self) -> None:
        with warnings.catch_warnings(), device_guard("warn"):
            warnings.simplefilter("ignore", DeviceMismatchWarning)
            with pytest.raises(RuntimeError) as info:
                torch.add(cpu(2), meta(2))
        assert not isinstance(info.value, CrossDeviceError)


class TestMove:
    def test_to_the_one_accelerator(self) -> None:
        with pytest.warns(DeviceMoveWarning, match=r"moved input to meta"), device_guard("move"):
            result = F.linear(cpu(8, 4), meta(3, 4), meta(3))
        assert result.device.type == "meta"
        assert result.shape == (8, 3)

    def test_to_the_explicit_target(self) -> None:
        x, y = torch.arange(3.0), torch.arange(3.0, device="meta")
        with device_guard("move", target="cpu"):
            assert (x + x).tolist() == [0.0, 2.0, 4.0]  # not mixed: nothing to move
            # meta tensors have no data to copy: a devicekit error, with torch's as its cause
            with pytest.raises(
                CrossDeviceError,
                match=r'device_guard\("move"\) cannot run it on cpu: moving other there failed '
                r"\(NotImplementedError: Cannot copy out of meta tensor",
            ) as caught:
                x + y
        assert isinstance(caught.value.__cause__, NotImplementedError)

    def test_to_the_default_device(self) -> None:
        token = _context._ACTIVE.set(torch.device("meta"))
        try:
            with pytest.warns(DeviceMoveWarning), device_guard("move"):
                assert torch.mm(cpu(2, 3), meta(3, 4)).device.type == "meta"
        finally:
            _context._ACTIVE.reset(token)

    def test_with_devicekit_default_device(self) -> None:
        x, w = cpu(2, 3), meta(3, 4)
        with devicekit.default_device("meta"), device_guard("move"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeviceMoveWarning)
            assert torch.ones(2).device.type == "meta"
            assert torch.mm(x, w).device.type == "meta"
        with devicekit.default_device("cpu"), device_guard(), pytest.raises(CrossDeviceError):
            torch.mm(x, w)

    def test_in_place_ops_run_where_their_destination_lives(self) -> None:
        destination, out = meta(2), meta(2)
        with warnings.catch_warnings(), device_guard("move", target="cpu"):
            warnings.simplefilter("ignore", DeviceMoveWarning)
            assert destination.add_(cpu(2)) is destination
            assert torch.add(cpu(2), cpu(2), out=out) is out
        assert destination.device.type == "meta"

    def test_out_none_is_not_a_destination(self) -> None:
        with warnings.catch_warnings(), device_guard("move"):
            warnings.simplefilter("ignore", DeviceMoveWarning)
            assert torch.add(cpu(2), meta(2), out=None).device.type == "meta"

    def test_a_cpu_tensor_indexed_by_an_accelerator_index_moves_to_the_index(self) -> None:
        # Issue 18 item 7: the CPU tensor goes to the index's device, as for any other op
        # (it used to try to copy the meta index to the CPU, a raw NotImplementedError).
        with pytest.warns(DeviceMoveWarning, match=r"moved self to meta"), device_guard("move"):
            result = cpu(5, 3)[index(1, 2, device="meta")]
        assert (result.device.type, result.shape) == ("meta", (2, 3))

    def test_indexing_an_accelerator_tensor_runs_where_it_lives(self) -> None:
        with device_guard("move"):
            result = meta(5, 3)[index(1, 2)]  # a CPU index is allowed, as on CUDA
        assert (result.device.type, result.shape) == ("meta", (2, 3))

    def test_an_in_place_index_that_cannot_be_moved_raises_a_devicekit_error(self) -> None:
        destination = cpu(5)
        with (
            device_guard("move"),
            pytest.raises(
                CrossDeviceError,
                match=r"(?s)Tensor.__setitem__ got tensors on different devices \(cpu, meta\).*"
                r'device_guard\("move"\) cannot run it on cpu: moving key there failed',
            ) as caught,
        ):
            destination[index(1, 2, device="meta")] = 1.0
        assert isinstance(caught.value.__cause__, NotImplementedError)
        assert destination.tolist() == [1.0] * 5

    def test_once_per_call_site(self) -> None:
        with warnings.catch_warnings(record=True) as record, device_guard("move"):
            warnings.simplefilter("always")
            for _ in range(3):
                torch.mm(cpu(2, 3), meta(3, 4))
        assert [r.category for r in record] == [DeviceMoveWarning]

    def test_silenceable(self) -> None:
        with warnings.catch_warnings(), device_guard("move"):
            warnings.simplefilter("ignore", DeviceMoveWarning)
            assert torch.mm(cpu(2, 3), meta(3, 4)).device.type == "meta"

    def test_two_accelerators_without_a_target_are_ambiguous(self) -> None:
        a, b = torch.device("cuda", 0), torch.device("cuda", 1)
        call = _guard._Call(torch.add, [], [a, b], None, None)
        assert _guard._target(call, _guard._GuardState("move", None)) is None
        assert _guard._target(call, _guard._GuardState("move", b)) == b
        mixed = _guard._Call(torch.add, [], [torch.device("cpu"), a], None, None)
        assert _guard._target(mixed, _guard._GuardState("move", None)) == a


class TestScoping:
    def test_no_mode_without_a_guard(self) -> None:
        assert not any(
            isinstance(mode, _guard._DeviceGuardMode)
            for mode in torch.overrides._get_current_function_mode_stack()
        )
        assert (cpu(2, 3) @ meta(3, 4)).device.type in ("cpu", "meta")

    def test_nested_guards_restore_the_outer_policy(self) -> None:
        with device_guard("error"):
            with device_guard("warn"), pytest.warns(DeviceMismatchWarning):
                torch.mm(cpu(2, 3), meta(3, 4))
            with pytest.raises(CrossDeviceError):
                torch.mm(cpu(2, 3), meta(3, 4))
            assert stack_depth() == 1
        assert _guard._ACTIVE_GUARD.get() is None

    def test_restored_after_an_exception(self) -> None:
        with pytest.raises(KeyError), device_guard():
            raise KeyError("boom")
        torch.mm(cpu(2, 3), meta(3, 4))  # unguarded again

    def test_other_threads_are_unaffected(self) -> None:
        seen: list[object] = []

        def worker() -> None:
            seen.append(stack_depth())
            seen.append(torch.mm(cpu(2, 3), meta(3, 4)).shape)

        with device_guard():
            thread = threading.Thread(target=worker)
            thread.start()
            thread.join(timeout=120)
            assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
        assert seen == [0, (2, 4)]

    def test_asyncio_tasks_see_their_own_guard(self) -> None:
        async def guarded(started: asyncio.Event, release: asyncio.Event) -> str:
            with device_guard():
                started.set()
                await release.wait()
                try:
                    torch.mm(cpu(2, 3), meta(3, 4))
                except CrossDeviceError:
                    return "raised"
                return "ran"

        async def unguarded(started: asyncio.Event, release: asyncio.Event) -> str:
            await started.wait()
            torch.mm(cpu(2, 3), meta(3, 4))
            release.set()
            return "ran"

        async def main() -> list[str]:
            started, release = asyncio.Event(), asyncio.Event()
            return list(
                await asyncio.gather(guarded(started, release), unguarded(started, release))
            )

        assert asyncio.run(main()) == ["raised", "ran"]

    def test_tasks_leaving_out_of_order_keep_the_stack_balanced(self) -> None:
        async def hold(first: asyncio.Event, second: asyncio.Event) -> None:
            with device_guard("warn"):
                first.set()
                await second.wait()

        async def main() -> None:
            first, second = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(hold(first, second))
            await first.wait()
            with device_guard("error"):
                second.set()
                await task  # the other task leaves first
                with pytest.raises(CrossDeviceError):
                    torch.mm(cpu(2, 3), meta(3, 4))

        asyncio.run(main())

    def test_decorates_functions_and_coroutines(self) -> None:
        guard = device_guard()

        @guard
        def step(x: torch.Tensor, *, weight: torch.Tensor) -> torch.Tensor:
            return x @ weight

        @guard
        async def astep(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            await asyncio.sleep(0)
            return x @ weight

        assert step.__name__ == "step"
        assert step(cpu(2, 3), weight=cpu(3, 4)).shape == (2, 4)
        with pytest.raises(CrossDeviceError):
            step(cpu(2, 3), weight=meta(3, 4))
        with pytest.raises(CrossDeviceError):
            asyncio.run(astep(cpu(2, 3), meta(3, 4)))
        assert asyncio.run(astep(cpu(2, 3), cpu(3, 4))).shape == (2, 4)

    def test_coexists_with_user_modes(self) -> None:
        calls: list[str] = []

        class Recorder(TorchFunctionMode):
            def __torch_function__(
                self,
                func: Callable[..., Any],
                types: Any,
                args: tuple[Any, ...] = (),
                kwargs: dict[str, Any] | None = None,
            ) -> Any:
                calls.append(getattr(func, "__name__", "?"))
                return func(*args, **(kwargs or {}))

        x, w = cpu(2, 3), meta(3, 4)
        recorder = Recorder()
        recorder.__enter__()
        guard = device_guard()
        guard.__enter__()
        inner = Recorder()
        inner.__enter__()
        with pytest.raises(CrossDeviceError):
            torch.mm(x, w)
        guard.__exit__(None, None, None)  # leaves before the inner user mode
        assert torch.overrides._get_current_function_mode_stack()[-2:] == [recorder, inner]
        torch.mm(x, x.T)  # seen by both user modes
        inner.__exit__(None, None, None)
        recorder.__exit__(None, None, None)
        # The guard stopped the mixed call before it reached the outer mode. Modes below the
        # guard see it read `.device` (`__get__`) and `.dim()`, so that modes reporting devices
        # of their own, such as `simulated_devices`, are believed.
        assert [name for name in calls if name not in ("__get__", "dim")] == ["mm", "mm", "mm"]

    def test_torch_default_device_coexists(self) -> None:
        on_cpu = cpu(2)
        with torch.device("meta"), device_guard():
            assert torch.ones(2).device.type == "meta"
            with pytest.raises(CrossDeviceError):
                torch.ones(2) + on_cpu

    def test_rejects_unknown_policies(self) -> None:
        with pytest.raises(devicekit.InvalidArgumentError, match="unknown policy 'raise'"):
            device_guard("raise")  # type: ignore[arg-type]

    def test_repr(self) -> None:
        assert repr(device_guard("move", target="meta")) == "device_guard('move', target='meta')"


# Property tests: random operand devices for a set of ops with fixed, compatible shapes.
OPS: dict[str, tuple[Callable[..., torch.Tensor], list[tuple[int, ...]]]] = {
    "torch.add": (torch.add, [(3, 4), (3, 4)]),
    "a * b": (lambda a, b: a * b, [(3, 4), (4,)]),
    "torch.cat": (lambda a, b, c: torch.cat([a, b, c]), [(2, 4), (1, 4), (3, 4)]),
    "torch.mm": (torch.mm, [(3, 4), (4, 2)]),
    "a @ b": (lambda a, b: a @ b, [(3, 4), (4, 2)]),
    "F.linear": (F.linear, [(5, 4), (3, 4), (3,)]),
    "torch.where": (lambda c, a, b: torch.where(c > 0, a, b), [(4,), (4,), (4,)]),
    "torch.addmm": (torch.addmm, [(2,), (3, 4), (4, 2)]),
    "scalar operand": (lambda a, s: a * s, [(3,), ()]),
}


@st.composite
def op_calls(draw: st.DrawFn) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    function, shapes = OPS[draw(st.sampled_from(sorted(OPS)))]
    operands = []
    for shape in shapes:
        device = draw(st.sampled_from(DEVICES))
        values = draw(
            st.lists(
                st.floats(-4, 4, allow_nan=False, width=32),
                min_size=int(torch.Size(shape).numel()),
                max_size=int(torch.Size(shape).numel()),
            )
        )
        operands.append(torch.tensor(values).reshape(shape).to(device))
    return function, operands


def mixes_devices(operands: list[torch.Tensor]) -> bool:
    return len({t.device for t in operands if not (t.device.type == "cpu" and t.dim() == 0)}) > 1


def outcome(function: Callable[..., torch.Tensor], operands: list[torch.Tensor]) -> object:
    try:
        result = function(*operands)
    except (RuntimeError, NotImplementedError) as error:
        return type(error)
    # `cpu @ meta` returns uninitialised memory: only results of unmixed calls have values.
    data = None if result.device.type == "meta" or mixes_devices(operands) else result.tolist()
    return (result.device, result.dtype, tuple(result.shape), data)


@given(op_calls())
def test_error_raises_exactly_when_devices_mix(
    call: tuple[Callable[..., torch.Tensor], list[torch.Tensor]],
) -> None:
    function, operands = call
    try:
        with device_guard():
            function(*operands)
    except CrossDeviceError:
        assert mixes_devices(operands)
    else:
        assert not mixes_devices(operands)


@given(op_calls())
def test_warn_never_changes_results(
    call: tuple[Callable[..., torch.Tensor], list[torch.Tensor]],
) -> None:
    function, operands = call
    with warnings.catch_warnings(record=True) as record, device_guard("warn"):
        warnings.simplefilter("always")
        guarded = outcome(function, operands)
    assert guarded == outcome(function, operands)
    assert bool(record) == mixes_devices(operands)


@given(op_calls(), st.sampled_from(DEVICES))
def test_move_matches_running_on_the_target(
    call: tuple[Callable[..., torch.Tensor], list[torch.Tensor]], target: str
) -> None:
    function, operands = call
    assume(target != "cpu" or all(t.device.type != "meta" for t in operands))  # no data to copy
    with warnings.catch_warnings(), device_guard("move", target=target):
        warnings.simplefilter("ignore", DeviceMoveWarning)
        moved = outcome(function, operands)
    on_target = [t if t.device.type == "cpu" and t.dim() == 0 else t.to(target) for t in operands]
    if mixes_devices(operands):
        assert moved == outcome(function, on_target)
    else:
        assert moved == outcome(function, operands)


# Where an operand sits in a call: positional, in a list or tuple argument, a keyword, or in a
# list under a keyword; and what it is: a tensor, an `nn.Parameter`, or a 0-dim tensor.
PLACES = ["positional", "list", "tuple", "keyword", "keyword list"]
KINDS = ["tensor", "parameter", "scalar"]


@st.composite
def placed_operands(draw: st.DrawFn) -> tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]]:
    count = draw(st.integers(1, 5))
    args: list[Any] = [draw(st.sampled_from([1, None, torch.Size([2])]))]
    kwargs: dict[str, Any] = {"flag": True}
    operands = []
    for position in range(count):
        kind = draw(st.sampled_from(KINDS))
        device = draw(st.sampled_from(DEVICES))
        tensor = torch.ones((), device=device) if kind == "scalar" else torch.ones(2, device=device)
        if kind == "parameter":
            tensor = torch.nn.Parameter(tensor)
        operands.append(tensor)
        place = draw(st.sampled_from(PLACES))
        if place == "positional":
            args.append(tensor)
        elif place in ("list", "tuple"):
            args.append([tensor, 2] if place == "list" else (tensor,))
        elif place == "keyword":
            kwargs[f"k{position}"] = tensor
        else:
            kwargs.setdefault("many", []).append(tensor)
    return tuple(args), kwargs, operands


@settings(max_examples=60)
@given(placed_operands())
def test_raises_exactly_when_operands_anywhere_mix(
    call: tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]],
) -> None:
    args, kwargs, operands = call
    try:
        with device_guard():
            combine(*args, **kwargs)
    except CrossDeviceError:
        assert mixes_devices(operands)
    else:
        assert not mixes_devices(operands)


# With simulated accelerators, tensors on "cuda:0" and "cuda:1" hold real values computed on the
# CPU, so "move" can be compared value for value with running everything on the target.
SIMULATED = ["cpu", "cuda:0", "cuda:1"]


@st.composite
def simulated_calls(
    draw: st.DrawFn,
) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor], list[str]]:
    function, shapes = OPS[draw(st.sampled_from(sorted(OPS)))]
    operands = [
        torch.tensor(
            draw(
                st.lists(
                    st.integers(-4, 4).map(float),
                    min_size=int(torch.Size(shape).numel()),
                    max_size=int(torch.Size(shape).numel()),
                )
            )
        ).reshape(shape)
        for shape in shapes
    ]
    devices = [draw(st.sampled_from(SIMULATED)) for _ in shapes]
    return function, operands, devices


@pytest.mark.skipif(CUDA, reason="simulated CUDA devices need a machine without CUDA")
@settings(max_examples=40)
@given(simulated_calls(), st.sampled_from(SIMULATED))
def test_move_gives_the_values_of_running_on_the_target(
    call: tuple[Callable[..., torch.Tensor], list[torch.Tensor], list[str]], target: str
) -> None:
    function, values, devices = call
    with devicekit.simulated_devices("cuda", 2):
        operands = [t.to(d) for t, d in zip(values, devices, strict=True)]
        with warnings.catch_warnings(), device_guard("move", target=target):
            warnings.simplefilter("ignore", DeviceMoveWarning)
            moved = function(*operands)
        on_target = function(*[t.to(target) for t in values])
        mixed = mixes_devices(operands)
        assert moved.device == (on_target.device if mixed else operands[0].device)
        assert moved.tolist() == on_target.tolist()


@pytest.mark.skipif(CUDA, reason="simulated CUDA devices need a machine without CUDA")
@settings(max_examples=40)
@given(simulated_calls())
def test_error_raises_exactly_when_simulated_devices_mix(
    call: tuple[Callable[..., torch.Tensor], list[torch.Tensor], list[str]],
) -> None:
    function, values, devices = call
    with devicekit.simulated_devices("cuda", 2):
        operands = [t.to(d) for t, d in zip(values, devices, strict=True)]
        try:
            with device_guard():
                function(*operands)
        except CrossDeviceError as error:
            assert mixes_devices(operands)
            assert "got tensors on different devices" in str(error)  # the guard's, not torch's
        else:
            assert not mixes_devices(operands)


def test_foreach_copy_between_devices_is_a_transfer() -> None:
    destinations = [torch.zeros(3, device="meta")]
    with device_guard():
        torch._foreach_copy_(destinations, [torch.ones(3)])
    assert destinations[0].device.type == "meta"
