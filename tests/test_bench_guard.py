"""`benchmarks/bench_guard.py` runs end to end and prints the tables issue 5 asks for.

Each batch runs its op once and reports a time that depends only on the condition, so that the
paired differences and ratios can be checked exactly; no figure here is a measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import devicekit
from benchmarks import bench_guard

# What one call costs under each condition, in the fake clock below.
COSTS = {"none": 2.0, "empty": 3.0, "guard": 3.5, "lean": 2.75, "bare": 3.25}


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    def batch_us(function: Callable[[], object], number: int) -> float:
        function()
        stack = torch.overrides._get_current_function_mode_stack()
        mode = type(stack[-1]).__name__ if stack else "none"
        return {
            "none": COSTS["none"],
            "EmptyMode": COSTS["empty"],
            "_DeviceGuardMode": COSTS["guard"],
            "LeanEmptyMode": COSTS["lean"],
            "BareCheckMode": COSTS["bare"],
        }[mode]

    monkeypatch.setattr(bench_guard, "batch_us", batch_us)
    monkeypatch.setattr(bench_guard, "calls_per_batch", lambda function: 1)


@pytest.mark.usefixtures("fake_clock")
def test_every_op_runs_under_every_condition_and_the_guard_then_leaves() -> None:
    results = bench_guard.alternate(bench_guard.cases(), rounds=3, seed=0)
    assert list(results) == [
        "torch.add(a, b), 4 elements",
        "a + b, 4 elements",
        "torch.cat of 4 tensors",
        "nn.Linear(64, 32) forward, batch 8",
    ]
    for samples in results.values():
        assert sorted(samples) == ["after", "bare", "empty", "guard", "lean", "none"]
        assert all(len(values) == 3 for values in samples.values())
        assert samples["after"] == [COSTS["none"]] * 3  # timed with no mode left on the stack
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.usefixtures("fake_clock")
def test_the_tables_show_paired_differences_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    bench_guard.main(["--rounds", "2"])
    out = capsys.readouterr().out
    assert "2 alternating rounds" in out
    assert (
        "| op | no mode | empty mode | device_guard | after guard | guard - empty "
        "| guard - empty, middle half | guard / none | empty / none |"
    ) in " ".join(out.split())
    linear = next(line for line in out.splitlines() if line.startswith("| nn.Linear"))
    cells = [cell.strip() for cell in linear.strip("|").split("|")]
    assert cells[1:] == ["2.00", "3.00", "3.50", "2.00", "0.50", "0.50 to 0.50", "1.75x", "1.50x"]
    reference = [line for line in out.splitlines() if line.startswith("| nn.Linear")][1]
    cells = [cell.strip() for cell in reference.strip("|").split("|")]
    assert cells[1:] == ["0.50", "-0.25", "0.25", "0.25", "0.00"]
    assert "| 3 tensors on meta (reads .device) |" in out


def test_the_bare_check_is_only_a_floor() -> None:
    with bench_guard.BareCheckMode(), pytest.raises(RuntimeError, match="only knows CPU"):
        torch.ones(2, device="meta") + torch.ones(2, device="meta")
    with bench_guard.BareCheckMode():
        assert torch.cat([torch.ones(1), torch.ones(1)]).tolist() == [1.0, 1.0]


def test_the_check_alone_table_keeps_the_guard_state_scoped() -> None:
    table = bench_guard.check_alone(rounds=1)
    assert table.splitlines()[0].split("|")[1].strip() == "tensor arguments"
    assert devicekit._guard._ACTIVE_GUARD.get() is None
