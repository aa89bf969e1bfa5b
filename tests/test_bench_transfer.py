"""`benchmarks/bench_transfer.py` runs end to end: its GPU section on a simulated CUDA device.

The timings are replaced by a constant: this checks that every code path of the benchmark runs
and prints its tables and plot, not any figure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import devicekit
from benchmarks import bench_transfer


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_transfer, "median_us", lambda function, **_: (function(), 2.0)[1])
    monkeypatch.setattr(bench_transfer, "GPU_SHAPES", {"(a)": [1024, 2048], "(b)": [256] * 8})
    monkeypatch.setattr(bench_transfer, "D2H_SHAPES", {"(d2h)": [256] * 8})
    monkeypatch.setattr(bench_transfer, "PLOT_COUNTS", [1, 4])
    monkeypatch.setattr(bench_transfer, "MIB", 4096)
    monkeypatch.setattr(
        bench_transfer, "CPU_SHAPES", {"4 x 64 B": lambda: [torch.ones(16) for _ in range(4)]}
    )


@pytest.mark.usefixtures("tiny")
def test_the_cpu_section_prints_its_table() -> None:
    table = bench_transfer.cpu_section(repeat=1)
    assert "| 4 x 64 B " in table
    assert "pack + unpack" in table


@pytest.mark.usefixtures("tiny")
def test_the_gpu_section_runs_on_a_simulated_cuda_device(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with devicekit.simulated_devices("cuda", 1):  # also answers torch.cuda's queries
        report = bench_transfer.gpu_section(1, plot=tmp_path / "plot.png")
    assert report.startswith("simulated cuda:0, torch ")
    for title in ("pinned sources", "pageable sources", "device -> host:", "crossover"):
        assert title in report
    assert "| (a) " in report
    assert "| (d2h) " in report
    assert (tmp_path / "plot.png").stat().st_size > 0
