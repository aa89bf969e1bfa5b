from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import _bench
from devicekit._bench import Measurement, crossovers, format_report, measure, overtakes_from
from devicekit._cli import main

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only a label here: nothing runs on it


def point(device: torch.device, op: Any, size: int, compute: float, transfer: float = 0.0) -> Any:
    return Measurement(device, op, size, compute, transfer)


@pytest.fixture
def tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bench, "DEFAULT_SIZES", {"elementwise": (16, 256), "matmul": (4, 8)})


def test_measure_cpu_has_no_transfer() -> None:
    result = measure(CPU, "elementwise", 64, repeat=3, budget_s=0.001)
    assert result.device == CPU
    assert (result.op, result.size) == ("elementwise", 64)
    assert result.compute_us > 0
    assert result.transfer_us == 0.0
    assert result.total_us == result.compute_us


def test_measure_other_device_counts_transfer_separately() -> None:
    # meta stands in for an accelerator: the copy path runs, so the transfer is timed
    result = measure(torch.device("meta"), "matmul", 8, repeat=3, budget_s=0.001)
    assert result.transfer_us > 0
    assert result.total_us == pytest.approx(result.compute_us + result.transfer_us)


def test_run_covers_every_device_op_and_size(tiny_sizes: None) -> None:
    seen: list[Measurement] = []
    results = _bench.run(
        [CPU, torch.device("meta")], repeat=2, budget_s=0.001, progress=seen.append
    )
    assert seen == results
    assert [(str(r.device), r.op, r.size) for r in results] == [
        (device, op, size)
        for device in ("cpu", "meta")
        for op, size in [("elementwise", 16), ("elementwise", 256), ("matmul", 4), ("matmul", 8)]
    ]


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.floats(0.1, 1e6, allow_nan=False), st.floats(0.1, 1e6, allow_nan=False)),
        max_size=10,
    )
)
def test_overtakes_from_is_the_start_of_the_final_winning_run(
    times: list[tuple[float, float]],
) -> None:
    sizes = [2**i for i in range(len(times))]
    baseline = [base for base, _ in times]
    other = [time_us for _, time_us in times]
    found = overtakes_from(sizes, baseline, other)
    if found is None:
        assert not times or other[-1] >= baseline[-1]
        return
    start = sizes.index(found)
    assert all(other[i] < baseline[i] for i in range(start, len(sizes)))
    assert start == 0 or other[start - 1] >= baseline[start - 1]


def test_overtakes_from_examples() -> None:
    assert overtakes_from([1, 2, 4], [5.0, 5.0, 5.0], [1.0, 9.0, 1.0]) == 4
    assert overtakes_from([1, 2, 4], [5.0, 5.0, 5.0], [1.0, 1.0, 1.0]) == 1
    assert overtakes_from([1, 2, 4], [5.0, 5.0, 5.0], [1.0, 1.0, 5.0]) is None
    assert overtakes_from([], [], []) is None


def fake_results() -> list[Measurement]:
    return [
        point(CPU, "matmul", 16, 2.0),
        point(CPU, "matmul", 64, 20.0),
        point(CPU, "matmul", 256, 2000.0),
        point(CUDA, "matmul", 16, 8.0, transfer=30.0),
        point(CUDA, "matmul", 64, 9.0, transfer=40.0),
        point(CUDA, "matmul", 256, 15.0, transfer=150.0),
        point(CPU, "elementwise", 1024, 3.0),
        point(CUDA, "elementwise", 1024, 7.0, transfer=20.0),
    ]


def test_crossovers_compute_and_with_transfers() -> None:
    found = {c.op: c for c in crossovers(fake_results())}
    assert set(found) == {"matmul", "elementwise"}
    assert (found["matmul"].device, found["matmul"].compute_from) == (CUDA, 64)
    assert found["matmul"].total_from == 256
    assert (found["elementwise"].compute_from, found["elementwise"].total_from) == (None, None)


def test_crossovers_need_a_cpu_baseline() -> None:
    only_cuda = [r for r in fake_results() if r.device == CUDA]
    assert crossovers(only_cuda) == []


def test_report_names_where_the_accelerator_overtakes() -> None:
    text = format_report(fake_results(), repeat=3)
    assert text.startswith("devicekit bench: median time per operation over 3 timed batches")
    assert "  size         cpu   cuda:0  cuda:0 + transfer\n" in text
    assert "  64       20.0 us   9.0 us            49.0 us\n" in text
    assert (
        "cuda:0 overtakes cpu for matmul: from size 64 (compute only), "
        "from size 256 counting transfers." in text
    )
    assert (
        "cuda:0 overtakes cpu for elementwise: never, at the sizes measured (compute only), "
        "never, at the sizes measured counting transfers." in text
    )


def test_report_cpu_only_says_so() -> None:
    text = format_report([r for r in fake_results() if r.device == CPU])
    assert "No accelerator was measured on this machine, so only the CPU curve is shown." in text
    assert "overtakes cpu" not in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    _bench.plot(fake_results(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_cpu_only(
    tiny_sizes: None,
    fake_backend: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("matplotlib")
    fake_backend(None)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    path = tmp_path / "curves.png"
    assert main(["bench", "--repeat", "2", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("devicekit bench: this machine has no accelerator that torch can use")
    assert "measuring the CPU curve only." in out
    assert f"The CPU runs each operation on {torch.get_num_threads()} thread(s)" in out
    assert "The machine is busy" not in out
    assert "matmul: matrix product a @ b" in out
    assert "only the CPU curve is shown" in out
    assert out.rstrip().endswith(f"Plot written to {path}.")
    assert path.stat().st_size > 0


def test_cli_bench_cpu_threads_and_busy_machine(
    tiny_sizes: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    assert main(["bench", "--repeat", "2", "--cpu-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"The CPU runs each operation on 1 thread(s); this machine has {cores} core(s)." in out
    assert f"The machine is busy (load average {float(cores):.1f} for {cores} cores)" in out
    assert torch.get_num_threads() == threads


def test_cli_bench_plot_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setattr(_bench, "run", lambda **kwargs: pytest.fail("measured before checking"))
    assert main(["bench", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "devicekit bench: error: --plot needs matplotlib, which is not installed. "
        "Install it with `pip install 'devicekit[plot]'` (or `pip install matplotlib`), "
        "or run without --plot.\n"
    )


def test_cli_bench_rejects_bad_repeat(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--repeat", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_cli_bench_with_a_simulated_gpu(
    tiny_sizes: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    if devicekit.accelerator_type() is not None:
        pytest.skip("simulation is for machines without an accelerator")
    path = tmp_path / "curves.png"
    with devicekit.simulated_devices("cuda", 1):
        assert main(["bench", "--repeat", "2", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no accelerator" not in out
    assert "  size  cpu" not in out  # every table has the accelerator's columns
    assert out.count("cuda:0 + transfer") == 2
    for op in ("elementwise", "matmul"):
        assert re.search(
            rf"^cuda:0 overtakes cpu for {op}: (from size [\d,]+|never, at the sizes measured) "
            r"\(compute only\), (from size [\d,]+|never, at the sizes measured) counting "
            r"transfers\.$",
            out,
            re.M,
        )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
