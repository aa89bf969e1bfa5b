from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import devicekit
from devicekit import TransferGuardError, _transfer_guard, transfer_guard
from devicekit._transfer_guard import implicit_transfer

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_mode_left_behind() -> Iterator[None]:
    before = torch._C._len_torch_function_stack()
    yield
    assert torch._C._len_torch_function_stack() == before
    assert _transfer_guard._ACTIVE_TRANSFER_GUARD.get() is None


Reader = Callable[[torch.Tensor], object]
HOST_READS: dict[str, Reader] = {
    "Tensor.item": lambda t: t.item(),
    "Tensor.tolist": lambda t: t.tolist(),
    "Tensor.numpy": lambda t: t.numpy(),
    "Tensor.__bool__": lambda t: bool(t),
    "Tensor.__float__": lambda t: float(t),
    "Tensor.__int__": lambda t: int(t),
    "Tensor.__index__": lambda t: [0, 1][t],
    "Tensor.__array__": lambda t: np.asarray(t),
}


class TestHostReads:
    @pytest.mark.parametrize(("operation", "read"), HOST_READS.items(), ids=HOST_READS.keys())
    def test_device_tensors_raise(
        self, operation: str, read: Callable[[torch.Tensor], object]
    ) -> None:
        tensor = torch.ones((), dtype=torch.int64, device="meta")
        with transfer_guard(), pytest.raises(TransferGuardError) as info:
            read(tensor)
        assert info.value.operation == operation
        assert info.value.tensor == "i64[] @ meta"
        assert info.value.location is not None
        assert info.value.location.startswith(f"{__file__}:")  # the lambda that read it
        assert isinstance(info.value, RuntimeError)

    @pytest.mark.parametrize("read", HOST_READS.values(), ids=HOST_READS.keys())
    def test_cpu_tensors_are_already_on_the_host(
        self, read: Callable[[torch.Tensor], object]
    ) -> None:
        with transfer_guard():
            read(torch.ones((), dtype=torch.int64))

    def test_if_on_a_device_tensor(self) -> None:
        flag = torch.ones((), device="meta")

        def branch() -> str:
            if flag:
                return "taken"
            return "not taken"

        with transfer_guard(), pytest.raises(TransferGuardError, match=r"Tensor\.__bool__"):
            branch()


class TestFromData:
    def test_device_tensors_from_python_data(self) -> None:
        with transfer_guard():
            with pytest.raises(TransferGuardError, match=r"torch\.tensor builds a tensor on meta"):
                torch.tensor([1.0, 2.0], device="meta")
            with pytest.raises(TransferGuardError, match=r"torch\.as_tensor builds"):
                torch.as_tensor(np.ones(3), device="meta")
            with pytest.raises(TransferGuardError, match=r"Tensor\.new_tensor builds"):
                torch.ones(2, device="meta").new_tensor([1.0])
            assert torch.tensor([1.0]).device.type == "cpu"
            assert torch.ones(2).new_tensor([1.0], device="cpu").device.type == "cpu"

    def test_through_default_devices(self) -> None:
        with transfer_guard():
            with torch.device("meta"), pytest.raises(TransferGuardError, match="on meta"):
                torch.tensor([1.0])
            with devicekit.default_device("meta"), pytest.raises(TransferGuardError):
                torch.tensor([1.0])

    def test_explicit_moves_are_allowed(self) -> None:
        with transfer_guard():
            on_cpu = torch.tensor([1.0, 2.0])
            assert on_cpu.to("meta").device.type == "meta"
            assert devicekit.to_device({"x": on_cpu}, "meta")["x"].device.type == "meta"
            assert torch.as_tensor(on_cpu, device="meta").device.type == "meta"
            assert torch.zeros(3, device="meta").device.type == "meta"  # no data to copy


class TestDecision:
    def test_device_specs_are_resolved_without_the_device(self) -> None:
        transfer = implicit_transfer(torch.tensor, ([1, 2],), {"device": "cuda:0"})
        assert transfer is not None
        assert (transfer.operation, transfer.tensor, transfer.direction) == (
            "torch.tensor",
            "list data",
            "to the device",
        )
        assert transfer.device == torch.device("cuda", 0)
        assert implicit_transfer(torch.tensor, ([1, 2],), {"device": "cpu"}) is None

    def test_other_ops_are_not_transfers(self) -> None:
        tensor = torch.ones(2, device="meta")
        assert implicit_transfer(torch.add, (tensor, tensor), {}) is None
        assert implicit_transfer(torch.Tensor.to, (tensor, "cpu"), {}) is None

    @given(st.sampled_from(sorted(HOST_READS)), st.sampled_from(["cpu", "meta"]))
    def test_host_reads_transfer_exactly_off_the_cpu(self, operation: str, device: str) -> None:
        func = getattr(torch.Tensor, operation.removeprefix("Tensor."))
        transfer = implicit_transfer(func, (torch.ones((), device=device),), {})
        assert (transfer is not None) == (device != "cpu")


class TestLog:
    def test_logs_and_lets_the_op_run(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING, logger="devicekit"), transfer_guard("log"):
            built = torch.tensor([1.0, 2.0], device="meta")
        assert built.device.type == "meta"
        assert [record.name for record in caplog.records] == ["devicekit"]
        assert (
            caplog.records[0]
            .getMessage()
            .startswith("transfer_guard: torch.tensor builds a tensor on meta from list data")
        )

    def test_nested_policies(self, caplog: pytest.LogCaptureFixture) -> None:
        with transfer_guard(), caplog.at_level(logging.WARNING, logger="devicekit"):
            with transfer_guard("log"):
                torch.tensor([1.0], device="meta")
            with pytest.raises(TransferGuardError):
                torch.tensor([1.0], device="meta")
        assert len(caplog.records) == 1


class TestScoping:
    def test_other_threads_are_unaffected(self) -> None:
        built: list[torch.Tensor] = []
        with transfer_guard():
            thread = threading.Thread(target=lambda: built.append(torch.tensor([1], device="meta")))
            thread.start()
            thread.join(timeout=120)
            assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
        assert built[0].device.type == "meta"

    def test_decorates_functions_and_coroutines(self) -> None:
        @transfer_guard()
        def step() -> torch.Tensor:
            return torch.tensor([1.0], device="meta")

        @transfer_guard()
        async def astep() -> torch.Tensor:
            await asyncio.sleep(0)
            return torch.tensor([1.0], device="meta")

        with pytest.raises(TransferGuardError):
            step()
        with pytest.raises(TransferGuardError):
            asyncio.run(astep())
        assert torch.tensor([1.0], device="meta").device.type == "meta"

    def test_rejects_unknown_policies(self) -> None:
        with pytest.raises(devicekit.InvalidArgumentError, match="unknown policy 'allow'"):
            transfer_guard("allow")  # type: ignore[arg-type]

    def test_repr(self) -> None:
        assert repr(transfer_guard("log")) == "transfer_guard('log')"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestCuda:
    def test_reads_and_builds(self) -> None:
        loss = torch.ones((), device="cuda")
        with transfer_guard():
            with pytest.raises(TransferGuardError, match=r"f32\[\] @ cuda:0"):
                loss.item()
            with pytest.raises(TransferGuardError):
                torch.tensor([1.0], device="cuda")
            assert loss.cpu().item() == 1.0
            assert devicekit.to_device(torch.ones(2), "cuda").device.type == "cuda"
