"""`benchmarks/bench_to_device.py` runs end to end: every mover on every shape, with ratios.

A fake timer gives each function a fixed cost, so that the printed ratios can be checked
exactly; no figure here is a measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks import bench_to_device

COSTS = {"devicekit": 12.0, "floor": 10.0, "aliasing floor": 11.0}
PEER_COST = 20.0


@pytest.fixture
def fake_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    def timed(functions: dict[str, Callable[[], object]], *, repeat: int) -> dict[str, float]:
        for function in functions.values():
            function()  # every mover really runs once
        return {name: COSTS.get(name, PEER_COST) for name in functions}

    monkeypatch.setattr(bench_to_device, "interleaved_median_us", timed)
    monkeypatch.setattr(
        bench_to_device,
        "SHAPES",
        {
            "flat dict": lambda: {"a": torch.ones(2), "b": torch.zeros(3)},
            "nested": lambda: {"child": {"x": [torch.ones(1), "text"]}},
        },
    )


@pytest.mark.usefixtures("fake_timer")
def test_prints_every_mover_with_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    bench_to_device.main(["--repeat", "1", "--target", "meta"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| flat", "| nested"))]
    flat, nested, flat_ratios, nested_ratios = rows
    assert "0.60" in nested_ratios
    cells = [cell.strip() for cell in flat.split("|")[1:-1]]
    assert cells[:7] == ["flat dict", "meta", "12.00", "10.00", "1.20", "11.00", "1.09"]
    assert [cell.strip() for cell in nested.split("|")[1:-1]][5:7] == ["-", "-"]
    assert "0.60" in flat_ratios  # devicekit / each peer
    assert "accelerate us" in out
    assert "torch pytree us" in out
    assert "aliasing floor" in out
