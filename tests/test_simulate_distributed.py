"""torchrun jobs written for GPUs, run under simulation: NCCL process groups carried by gloo.

`tests/programs/gpu_train.py` is launched with torchrun and two ranks, as tests/test_distributed.py
launches its gloo script: once on the CPU with gloo, once from inside `simulated_devices("cuda",
2)` (the ranks inherit it), and once with a rank that uses the wrong device.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from devicekit import simulated_devices
from devicekit._errors import SimulationError
from devicekit._simulate_distributed import _gloo_for
from tests.machine import REAL_CUDA
from tests.test_distributed import launch

SCRIPT = Path(__file__).resolve().parent / "programs" / "gpu_train.py"

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed"),
    pytest.mark.skipif(REAL_CUDA, reason="these runs simulate CUDA; on a CUDA machine it is real"),
]


def _ranks(out: Path) -> list[dict[str, object]]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, object]]]:
    cpu, cuda = tmp_path_factory.mktemp("cpu"), tmp_path_factory.mktemp("cuda")
    done = launch(cpu, SCRIPT, "cpu", str(cpu))
    assert done.returncode == 0, f"the gloo CPU run failed:\n{done.stderr}"
    with simulated_devices("cuda", 2):
        done = launch(cuda, SCRIPT, "cuda", str(cuda))
    assert done.returncode == 0, f"the simulated NCCL run failed:\n{done.stderr}"
    return {"cpu": _ranks(cpu), "cuda": _ranks(cuda), "checkpoint": [{"path": str(cuda)}]}


def test_each_rank_runs_on_its_own_simulated_device(
    runs: dict[str, list[dict[str, object]]],
) -> None:
    for rank, report in enumerate(runs["cuda"]):
        assert report["parameter_device"] == f"cuda:{rank}"
        assert report["reduced_device"] == f"cuda:{rank}"
        assert report["current_device"] == rank


def test_losses_equal_the_gloo_cpu_run(runs: dict[str, list[dict[str, object]]]) -> None:
    for simulated, plain in zip(runs["cuda"], runs["cpu"], strict=True):
        assert simulated["losses"] == plain["losses"]
    assert runs["cuda"][0]["losses"] == runs["cuda"][1]["losses"]  # all_reduce averaged them


def test_rank_zero_wrote_a_checkpoint(runs: dict[str, list[dict[str, object]]]) -> None:
    path = Path(str(runs["checkpoint"][0]["path"])) / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_a_rank_using_the_wrong_device_fails_with_devicekits_message(tmp_path: Path) -> None:
    with simulated_devices("cuda", 2):
        done = launch(tmp_path, SCRIPT, "cuda", str(tmp_path), "wrong-device")
    assert done.returncode != 0
    assert "CrossDeviceError" in done.stderr
    assert "cuda:1 and cuda:0" in done.stderr
    assert "gpu_train.py" in done.stderr


def test_nccl_maps_to_gloo_in_one_process() -> None:
    store = dist.HashStore()
    with simulated_devices("cuda", 2):
        assert dist.is_nccl_available()
        dist.init_process_group(
            "nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 1)
        )
        try:
            assert dist.get_backend() == "gloo"
            assert torch.cuda.current_device() == 1
            tensor = torch.ones(3, device="cuda")
            dist.all_reduce(tensor)
            assert tensor.device == torch.device("cuda:1")
            group = dist.new_group([0], datetime.timedelta(seconds=60), "nccl")
            assert dist.get_backend(group) == "gloo"
        finally:
            dist.destroy_process_group()
    assert dist.init_process_group.__module__ == "torch.distributed.distributed_c10d"


def _tensor() -> torch.Tensor:
    return torch.arange(4.0, device="cuda:1")


COLLECTIVES = {
    "all_reduce": lambda: dist.all_reduce(_tensor()),
    "broadcast": lambda: dist.broadcast(_tensor(), 0),
    "all_gather": lambda: dist.all_gather([_tensor()], _tensor()),
    "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(_tensor(), _tensor()),
    "gather": lambda: dist.gather(_tensor(), [_tensor()], 0),
    "scatter": lambda: dist.scatter(_tensor(), [_tensor()], 0),
    "reduce": lambda: dist.reduce(_tensor(), 0),
    "reduce_scatter": lambda: dist.reduce_scatter(_tensor(), [_tensor()]),
    "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(_tensor(), _tensor()),
    "all_to_all": lambda: dist.all_to_all([_tensor()], [_tensor()]),
    "all_to_all_single": lambda: dist.all_to_all_single(_tensor(), _tensor()),
    "barrier": lambda: dist.barrier(),
    "all_gather_object": lambda: dist.all_gather_object([None], {"a": 1}),
    "broadcast_object_list": lambda: dist.broadcast_object_list([1], 0),
}


@pytest.mark.filterwarnings("ignore:`torch.distributed.*` is deprecated:FutureWarning")
def test_the_documented_collectives_run_on_simulated_cuda_tensors() -> None:
    with simulated_devices("cuda", 2):
        torch.cuda.set_device(1)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        try:
            for name, collective in COLLECTIVES.items():
                collective()  # raises, naming the collective in the traceback, if not covered
                assert (
                    name in (Path(__file__).parent.parent / "docs" / "distributed.md").read_text()
                )
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("backend", [None, "nccl", "gloo", "cpu:gloo,cuda:nccl", "NCCL"])
def test_every_nccl_spelling_runs_on_gloo(backend: str | None) -> None:
    assert _gloo_for(backend, "init_process_group") == "gloo"


def test_other_backends_are_refused() -> None:
    with pytest.raises(SimulationError, match=r"init_process_group\(backend='mpi'\): devicekit"):
        _gloo_for("mpi", "init_process_group")
