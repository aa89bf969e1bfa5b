"""Whole programs written for GPUs run unchanged on simulated devices, with the CPU's losses.

The programs in tests/programs/ say only "cuda" (their `--device cpu` run is the reference).
Each runs in this process, as `python PROGRAM ...` would run it, inside `simulated_devices`.
With autocast off and one thread the losses are bit-identical to the CPU run's; with float16 or
bfloat16 autocast they agree within those formats' precision.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import devicekit

PROGRAMS = Path(__file__).parent / "programs"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: CPU kernels then sum in one order, so runs are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def run_program(
    monkeypatch: pytest.MonkeyPatch, name: str, out: Path, *args: str, gpus: int = 0
) -> dict[str, Any]:
    """Run tests/programs/NAME as `python NAME OUT ARGS...`, on `gpus` simulated GPUs (or the
    CPU, with `--device cpu`, when 0), and read back the result it wrote."""
    path = PROGRAMS / name
    if gpus:
        monkeypatch.setattr(sys, "argv", [str(path), str(out), *args])
        with devicekit.simulated_devices("cuda", gpus):
            runpy.run_path(str(path), run_name="__main__")
    else:
        monkeypatch.setattr(sys, "argv", [str(path), str(out), "--device", "cpu", *args])
        runpy.run_path(str(path), run_name="__main__")
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


def test_gpt_training_gives_the_cpu_losses_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cpu = run_program(monkeypatch, "gpt_train.py", tmp_path / "cpu")
    gpu = run_program(monkeypatch, "gpt_train.py", tmp_path / "gpu", gpus=1)
    assert gpu["losses"] == cpu["losses"]
    assert gpu["sample"] == cpu["sample"]
    assert (gpu["parameter_device"], gpu["sample_device"]) == ("cuda:0", "cuda:0")
    assert cpu["parameter_device"] == "cpu"


def test_gpt_training_resumes_from_its_checkpoint_as_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    results = []
    for gpus, folder in ((0, tmp_path / "cpu"), (1, tmp_path / "gpu")):
        run_program(monkeypatch, "gpt_train.py", folder, "--steps", "3", gpus=gpus)
        results.append(
            run_program(monkeypatch, "gpt_train.py", folder, "--steps", "3", "--resume", gpus=gpus)
        )
    cpu, gpu = results
    assert gpu["losses"] == cpu["losses"]
    assert gpu["sample"] == cpu["sample"]
    # the checkpoint says where its tensors were, as a real CUDA checkpoint does
    saved = torch.load(tmp_path / "gpu" / "ckpt.pt", map_location="cpu")
    assert saved["step"] == 6
    assert saved["model"]["head.weight"].device == torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpt_training_with_autocast_agrees_within_the_formats_precision(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dtype: str
) -> None:
    cpu = run_program(monkeypatch, "gpt_train.py", tmp_path / "cpu")
    gpu = run_program(monkeypatch, "gpt_train.py", tmp_path / "gpu", "--dtype", dtype, gpus=1)
    assert gpu["loss_dtype"] == "torch.float32"  # cross_entropy runs in float32 under autocast
    assert gpu["losses"] != cpu["losses"]  # the matmuls really ran in the low precision
    tolerance = 1e-3 if dtype == "float16" else 1e-2
    torch.testing.assert_close(
        torch.tensor(gpu["losses"]), torch.tensor(cpu["losses"]), rtol=tolerance, atol=0
    )


@pytest.mark.slow
def test_gpt_training_compiled_gives_the_cpu_losses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cpu = run_program(monkeypatch, "gpt_train.py", tmp_path / "cpu")
    gpu = run_program(
        monkeypatch, "gpt_train.py", tmp_path / "gpu", "--compile", "aot_eager", gpus=1
    )
    assert gpu["losses"] == cpu["losses"]
    assert gpu["sample"] == cpu["sample"]


@pytest.mark.parametrize("gpus", [1, 2])
def test_multi_gpu_training_gives_the_cpu_losses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gpus: int
) -> None:
    cpu = run_program(monkeypatch, "multi_gpu.py", tmp_path / "cpu")
    gpu = run_program(monkeypatch, "multi_gpu.py", tmp_path / "gpu", gpus=gpus)
    assert gpu["data_parallel"] is (gpus > 1)
    assert gpu["gpus"] == gpus
    assert gpu["output_device"] == "cuda:0"
    assert gpu["allocated"][0] > 0
    torch.testing.assert_close(
        torch.tensor(gpu["losses"]), torch.tensor(cpu["losses"]), rtol=1e-6, atol=0
    )
