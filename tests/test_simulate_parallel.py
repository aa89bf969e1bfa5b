"""`nn.DataParallel` and `nn.parallel.*` across simulated devices, with the CPU's results."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import comm, data_parallel, gather, replicate, scatter

import devicekit
from devicekit import CrossDeviceError

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def cpu_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = small_model()
    out = model(x)
    out.sum().backward()
    weight = model[0].weight
    assert weight.grad is not None
    return out.detach(), weight.grad


def test_replicate_scatter_gather_place_and_compute_as_on_gpus() -> None:
    x = torch.randn(6, 4)
    expected, expected_grad = cpu_reference(x)
    with devicekit.simulated_devices("cuda", 2):
        model = small_model().cuda()
        replicas = replicate(model, [0, 1])
        assert [replica[0].weight.device for replica in replicas] == [CUDA0, CUDA1]
        parts = scatter(x.cuda(), [0, 1])
        assert [part.device for part in parts] == [CUDA0, CUDA1]
        outputs = [replica(part) for replica, part in zip(replicas, parts, strict=True)]
        assert [output.device for output in outputs] == [CUDA0, CUDA1]
        result = gather(outputs, 0)
        assert result.device == CUDA0
        assert torch.equal(result.detach().cpu(), expected)
        result.sum().backward()
        grad = model[0].weight.grad
        assert grad is not None
        assert grad.device == CUDA0
        torch.testing.assert_close(grad.cpu(), expected_grad)


@pytest.mark.parametrize("count", [1, 2])
def test_data_parallel_gives_the_cpu_results(count: int) -> None:
    x = torch.randn(6, 4)
    expected, expected_grad = cpu_reference(x)
    with devicekit.simulated_devices("cuda", count):
        model = small_model().cuda()
        out = data_parallel(model, x.cuda(), list(range(count)))
        assert out.device == CUDA0
        torch.testing.assert_close(out.detach().cpu(), expected)
        wrapped = nn.DataParallel(model)
        assert wrapped.device_ids == list(range(count))
        out = wrapped(x)  # a CPU batch is scattered from the host, as on GPUs
        assert out.device == CUDA0
        out.sum().backward()
        grad = model[0].weight.grad
        assert grad is not None
        assert grad.device == CUDA0
        torch.testing.assert_close(grad.cpu(), expected_grad)


def test_a_replica_using_the_wrong_device_is_a_cross_device_error() -> None:
    class Offsets(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + torch.ones(2, device="cuda:0")  # the bug: not x.device

    with devicekit.simulated_devices("cuda", 2):
        wrapped = nn.DataParallel(Offsets().cuda())
        x = torch.randn(4, 4, device="cuda")
        # parallel_apply re-raises a replica's error as torch does on GPUs: a RuntimeError
        # naming the replica, with the original error's text and traceback
        with pytest.raises(RuntimeError, match="in replica 1 on device 1") as caught:
            wrapped(x)
        assert f"Caught {CrossDeviceError.__name__}" in str(caught.value)
        assert "cuda:1 and cuda:0" in str(caught.value)
        with pytest.raises(CrossDeviceError, match="cuda:1 and cuda:0"):
            replicate(wrapped.module, [0, 1])[1](x.to("cuda:1"))


def test_comm_functions_copy_between_devices() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    with devicekit.simulated_devices("cuda", 2):
        source = x.cuda()
        first, second = comm.broadcast(source, [0, 1])
        assert first is source
        assert (second.device, torch.equal(second.cpu(), x)) == (CUDA1, True)
        coalesced = comm.broadcast_coalesced([source, source[0]], [0, 1])
        assert [t.device for t in coalesced[1]] == [CUDA1, CUDA1]
        assert torch.equal(coalesced[1][1].cpu(), x[0])
        total = comm.reduce_add([source, second], destination=1)
        assert (total.device, torch.equal(total.cpu(), 2 * x)) == (CUDA1, True)
        summed = comm.reduce_add_coalesced([[source, source[0]], [second, second[0]]], 0)
        assert [t.device for t in summed] == [CUDA0, CUDA0]
        assert torch.equal(summed[1].cpu(), 2 * x[0])
        chunks = comm.scatter(source, [1, 0], chunk_sizes=[4, 2])
        assert [(c.device, c.shape[0]) for c in chunks] == [(CUDA1, 4), (CUDA0, 2)]
        back = comm.gather(chunks, destination="cpu")
        assert (back.device, torch.equal(back, x)) == (torch.device("cpu"), True)
        out = torch.empty(6, 2, device="cuda:1")
        assert comm.gather(chunks, out=out) is out
        assert torch.equal(out.cpu(), x)
        outs = [torch.empty(3, 2, device="cuda:0"), torch.empty(3, 2, device="cuda:1")]
        comm.scatter(source, out=outs)
        assert torch.equal(outs[1].cpu(), x[3:])


def test_comm_is_torchs_own_again_after_the_simulation() -> None:
    originals = {name: getattr(comm, name) for name in ("broadcast_coalesced", "scatter", "gather")}
    streams = torch.nn.parallel._functions._streams
    with devicekit.simulated_devices("cuda", 2):
        nn.DataParallel(small_model().cuda())(torch.randn(4, 4))
        assert comm.scatter is not originals["scatter"]
    assert {name: getattr(comm, name) for name in originals} == originals
    assert torch.nn.parallel._functions._streams is streams


def test_data_parallel_replicas_follow_cuda_autocast() -> None:
    """parallel_apply re-enters CUDA autocast in each replica's thread, as on GPUs."""
    with devicekit.simulated_devices("cuda", 2):
        wrapped = nn.DataParallel(small_model().cuda())
        with torch.autocast("cuda", dtype=torch.float16):
            out = wrapped(torch.randn(6, 4))
        assert (out.device, out.dtype) == (CUDA0, torch.float16)
        out.float().sum().backward()
        grad = wrapped.module[0].weight.grad
        assert grad is not None
        assert (grad.device, grad.dtype) == (CUDA0, torch.float32)
