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
from devicekit import _bench, _cli
from devicekit._bench import Measurement, crossovers, format_report, measure, overtakes_from
from devicekit._cli import _print_bench_setting, main

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


def test_cli_bench_smoke(
    tiny_sizes: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`devicekit bench` end to end at tiny sizes on a simulated GPU: every table well formed."""
    pytest.importorskip("matplotlib")
    if devicekit.accelerator_type() is not None:
        pytest.skip("simulation is for machines without an accelerator")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    threads = torch.get_num_threads()
    path = tmp_path / "curves.png"
    with devicekit.simulated_devices("cuda", 1):
        assert main(["bench", "--repeat", "2", "--cpu-threads", "1", "--plot", str(path)]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "no accelerator" not in out
    assert "The CPU runs each operation on 1 thread(s)" in out
    assert "The machine is busy" not in out
    for op, sizes in _bench.DEFAULT_SIZES.items():
        table = out.split(f"\n{op}: {_bench.OPS[op]}\n")[1].split("\n\n")[0].splitlines()
        assert table[0].split() == ["size", "cpu", "cuda:0", "cuda:0", "+", "transfer"]
        assert [row.split()[0] for row in table[1:]] == [f"{size:,}" for size in sizes]
        for row in table[1:]:
            cells = re.findall(r"([\d,]+\.\d) (us|ms)", row)
            assert len(cells) == 3, row
            _, compute, total = (
                float(v.replace(",", "")) * (1e3 if u == "ms" else 1) for v, u in cells
            )
            assert 0 < compute <= total + 0.05  # with the transfers, never less than without
        assert re.search(
            rf"^cuda:0 overtakes cpu for {op}: (from size [\d,]+|never, at the sizes measured) "
            r"\(compute only\), (from size [\d,]+|never, at the sizes measured) counting "
            r"transfers\.$",
            out,
            re.M,
        )
    assert out.rstrip().endswith(f"Plot written to {path}.")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_busy_machine_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
    _print_bench_setting(2)
    assert capsys.readouterr().out == (
        f"The CPU runs each operation on 2 thread(s); this machine has {cores} core(s).\n"
        f"The machine is busy (load average {float(cores):.1f} for {cores} cores): CPU timings "
        "that jump to milliseconds mean other processes hold the cores the CPU's threads wait "
        "for; rerun when it is idle, or with --cpu-threads 1.\n"
    )


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (
            "missing/x.png",
            "cannot write there (No such file or directory). Choose a writable path.",
        ),
        ("x.nope", "matplotlib cannot write .nope files. Use one of "),
        (".", "cannot write there (Is a directory). Choose a writable path."),
    ],
    ids=["no-folder", "no-format", "folder"],
)
def test_cli_bench_checks_the_plot_path_before_measuring(
    name: str,
    problem: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(_bench, "run", lambda **kwargs: pytest.fail("measured before checking"))
    path = str(tmp_path / name)
    assert main(["bench", "--plot", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"devicekit bench: error: --plot {path}: {problem}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the check leaves no file behind


def test_cli_bench_plot_check_keeps_an_existing_file(
    tiny_sizes: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "old.png"
    path.write_bytes(b"old")
    assert _cli._plot_problem(str(path)) is None
    assert path.read_bytes() == b"old"


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
