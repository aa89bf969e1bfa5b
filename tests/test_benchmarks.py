"""One smoke test per benchmark: each runs end to end at a tiny size, with real timings.

Timed batches last `_timing.BATCH_S` seconds; these tests lower it to a tenth of a millisecond,
and shrink the benchmarks' inputs where they are large, so that every code path runs in moments.
No figure is checked against a number: the tables are, for shape (a row per case, a cell per
column, numbers where numbers belong) and for arithmetic (each ratio or difference agrees with
the cells it is computed from, to the rounding of the printed figures).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import devicekit
from benchmarks import (
    _timing,
    bench_default_device,
    bench_guard,
    bench_simulate,
    bench_to_device,
    bench_transfer,
    run_all,
)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def column(self, header: str) -> list[str]:
        index = self.headers.index(header)
        return [row[index] for row in self.rows]

    def number(self, row: list[str], header: str) -> float:
        return float(row[self.headers.index(header)].rstrip("x*"))


def tables(text: str) -> list[Table]:
    """Every Markdown table in `text`, each checked to have as many cells per row as headers."""
    found: list[Table] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in block]
            assert re.fullmatch(r"\|(-+\|)+", block[1]), block[1]  # the separator
            headers, rows = cells[0], cells[2:]
            assert all(len(row) == len(headers) for row in rows), block
            found.append(Table(headers, rows))
            block = []
    return found


NUMBER = r"-?\d+\.\d\d"  # a float as `format_table` prints it
RATIO = r"\d+\.\d\dx"


def assert_cells(table: Table, header: str, pattern: str) -> None:
    for cell in table.column(header):
        assert re.fullmatch(pattern, cell), (header, cell)


def assert_ratio(value: float, top: float, bottom: float) -> None:
    """`value` is `top / bottom`, computed before the three were rounded to two decimals."""
    assert bottom > 0, bottom
    corners = [
        t / max(b, 1e-9)
        for t in (top - 0.005, top + 0.005)
        for b in (bottom - 0.005, bottom + 0.005)
    ]
    assert min(corners) - 0.005 <= value <= max(corners) + 0.005, (value, top, bottom)


@pytest.fixture(autouse=True)
def tiny_batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Batches of a tenth of a millisecond; torch's thread count restored after each test
    (the benchmarks set one thread)."""
    monkeypatch.setattr(_timing, "BATCH_S", 1e-4)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_to_device(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    small = {
        "1. dict of 8 tensors": bench_to_device.SHAPES["1. dict of 8 tensors"],
        "list of 50 tensors": lambda: [bench_to_device._tensor(i) for i in range(50)],
        "4. tensor under 50 dicts": bench_to_device._nested,
        "6. 96 in namedtuples+dataclasses": bench_to_device._samples,
    }
    monkeypatch.setattr(bench_to_device, "SHAPES", small)
    bench_to_device.main(["--repeat", "1", "--target", "cpu", "meta"])
    timings, ratios = tables(capsys.readouterr().out)
    peers = timings.headers[7:]
    assert timings.headers[:7] == [
        "shape",
        "to",
        "devicekit us",
        "floor us",
        "x floor",
        "aliasing floor us",
        "x aliasing floor",
    ]
    assert "torch pytree us" in peers  # torch's own, always there
    expected = [(shape, target) for target in ("cpu", "meta") for shape in small]
    assert [(row[0], row[1]) for row in timings.rows] == expected
    for row in timings.rows:
        ours = timings.number(row, "devicekit us")
        assert_ratio(timings.number(row, "x floor"), ours, timings.number(row, "floor us"))
        flat = row[0].startswith(("1.", "list"))
        assert (row[5] == "-") is not flat  # the aliasing floor exists for flat batches only
        if flat:
            aliasing = timings.number(row, "aliasing floor us")
            assert_ratio(timings.number(row, "x aliasing floor"), ours, aliasing)
        for cell in row[7:]:
            assert re.fullmatch(NUMBER + r"\*?", cell), cell
    # devicekit time / each peer's, per row, and the worst of them.
    assert ratios.headers == [
        "shape",
        "to",
        *(p.removesuffix(" us") for p in peers),
        "worst",
        "shape 4",
    ]
    for row, timed in zip(ratios.rows, timings.rows, strict=True):
        assert row[:2] == timed[:2]
        ours = timings.number(timed, "devicekit us")
        shares = [float(cell) for cell in row[2:-2]]
        for share, cell in zip(shares, timed[7:], strict=True):
            assert_ratio(share, ours, float(cell.rstrip("*")))
        assert float(row[-2]) == max(shares)
        assert row[-1].endswith(" us/level") is row[0].startswith("4.")


def test_bench_default_device(capsys: pytest.CaptureFixture[str]) -> None:
    bench_default_device.main(["--rounds", "3"])
    ops, blocks = tables(capsys.readouterr().out)
    assert ops.headers == [
        "op",
        "bare us",
        "torch.device overhead us",
        "devicekit overhead us",
        "ratio",
    ]
    assert ops.column("op") == list(bench_default_device._ops())
    for header in ops.headers[1:4]:
        assert_cells(ops, header, NUMBER)
    for row in ops.rows:
        torch_added = ops.number(row, "torch.device overhead us")
        ratio = row[4]
        if torch_added > 0.01:  # the ratio is of the unrounded overheads
            assert_ratio(float(ratio), ops.number(row, "devicekit overhead us"), torch_added)
        else:
            assert re.fullmatch(NUMBER + "|nan", ratio), ratio
    assert blocks.headers == ["block", "torch.device us", "devicekit us", "ratio"]
    assert blocks.column("block") == [
        "enter and leave, outermost block",
        "enter and leave, nested block",
    ]
    for row in blocks.rows:
        assert_ratio(
            blocks.number(row, "ratio"),
            blocks.number(row, "devicekit us"),
            blocks.number(row, "torch.device us"),
        )
    assert devicekit.current_device() == torch.device("cpu")


def test_bench_guard(capsys: pytest.CaptureFixture[str]) -> None:
    bench_guard.main(["--rounds", "2"])
    out = capsys.readouterr().out
    assert out.startswith(f"torch {torch.__version__}, 1 CPU thread(s), 2 alternating rounds")
    in_place, references, alone, provenance, simulated = tables(out)
    ops = list(bench_guard.cases())
    assert in_place.column("op") == ops
    assert in_place.headers[1:5] == ["no mode", "empty mode", "device_guard", "after guard"]
    for header in in_place.headers[1:6]:
        assert_cells(in_place, header, NUMBER)
    assert_cells(in_place, "guard - empty, middle half", rf"{NUMBER} to {NUMBER}")
    for row in in_place.rows:
        low, high = (float(v) for v in row[6].split(" to "))
        assert low <= high
    assert_cells(in_place, "guard / none", RATIO)
    assert_cells(in_place, "empty / none", RATIO)
    assert references.column("op") == ops
    for header in references.headers[1:]:
        assert_cells(references, header, NUMBER)
    assert alone.headers == ["tensor arguments", "empty mode", "device_guard", "guard - empty"]
    assert len(alone.rows) == 8
    for header in alone.headers[1:]:
        assert_cells(alone, header, NUMBER)
    assert provenance.headers[-1] == "guard cost with / without recording"
    assert len(provenance.rows) == 5
    for header in provenance.headers[1:-1]:
        assert_cells(provenance, header, NUMBER)
    # With two noisy rounds the guard's cost over no guard can come out below zero: a sign.
    assert_cells(provenance, provenance.headers[-1], "-?" + RATIO)
    assert simulated.headers[-1] == "on / off"
    assert simulated.column("op under simulated_devices")[0] == "a + b on cuda:0 (no factory)"
    assert len(simulated.rows) == 4
    for header in simulated.headers[1:-1]:
        assert_cells(simulated, header, NUMBER)
    assert_cells(simulated, "on / off", RATIO)
    # The guard left nothing behind: no torch function mode, no active guard state.
    assert torch._C._len_torch_function_stack() == 0
    assert devicekit._guard._ACTIVE_GUARD.get() is None


def test_bench_transfer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    if torch.cuda.is_available():
        pytest.skip("the GPU section runs on a simulated CUDA device here")
    monkeypatch.setattr(bench_transfer, "GPU_SHAPES", {"(a)": [1024, 2048], "(b)": [256] * 8})
    monkeypatch.setattr(bench_transfer, "D2H_SHAPES", {"(d2h)": [256] * 8})
    monkeypatch.setattr(bench_transfer, "PLOT_COUNTS", [1, 4])
    monkeypatch.setattr(bench_transfer, "MIB", 4096)
    monkeypatch.setattr(
        bench_transfer,
        "CPU_SHAPES",
        {
            "4 x 64 B": lambda: [torch.ones(16) for _ in range(4)],
            "3 shapes": lambda: [torch.ones(2, i + 1) for i in range(3)],
        },
    )
    plot = tmp_path / "throughput.png"
    with devicekit.simulated_devices("cuda", 1):  # also answers torch.cuda's queries
        bench_transfer.main(["--repeat", "1", "--plot", str(plot)])
    out = capsys.readouterr().out
    cpu, pinned, pageable, d2h, crossover = tables(out)
    assert cpu.column("tensors") == ["4 x 64 B", "3 shapes"]
    for row in cpu.rows:
        plan, pack, unpack = (cpu.number(row, h) for h in ("plan", "pack", "unpack"))
        assert abs(cpu.number(row, "pack + unpack") - (pack + unpack)) <= 0.011
        assert abs(cpu.number(row, "all three") - (plan + pack + unpack)) <= 0.016
    for table, shapes in ((pinned, ["(a)", "(b)"]), (pageable, ["(a)", "(b)"]), (d2h, ["(d2h)"])):
        assert table.headers == bench_transfer._GPU_HEADERS
        assert table.column("shape") == shapes
        for header in table.headers[1:]:
            assert_cells(table, header, NUMBER + "|-")
    assert crossover.headers == ["tensor size", "coalesced us", "alone us", "alone / coalesced"]
    for row in crossover.rows:
        assert_ratio(
            crossover.number(row, "alone / coalesced"),
            crossover.number(row, "alone us"),
            crossover.number(row, "coalesced us"),
        )
    assert out.rstrip().endswith(f"Plot written to {plot}.")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


#: The minGPT-size case of `bench_simulate`, shrunk to run in a few milliseconds.
TINY_GPT = {"layers": 1, "width": 8, "heads": 2, "vocab": 16, "batch": 2, "tokens": 4}


def test_bench_simulate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("simulation is refused where CUDA is real")
    monkeypatch.setattr(bench_simulate, "GPT_SIZE", TINY_GPT)
    bench_simulate.main(["--rounds", "2"])
    table, per_op = tables(capsys.readouterr().out)
    assert per_op.column("op") == list(bench_simulate.per_op_cases("cpu"))
    assert table.headers == ["op", "cpu", "simulated cuda:0", "added", "ratio"]
    assert table.column("op") == list(bench_simulate.cases("cpu"))
    assert table.column("op")[-1] == "minGPT-size training step"
    for row in table.rows:
        cpu, simulated = table.number(row, "cpu"), table.number(row, "simulated cuda:0")
        assert abs(table.number(row, "added") - (simulated - cpu)) <= 0.011
        assert_ratio(table.number(row, "ratio"), simulated, cpu)
    assert not torch.cuda.is_available()  # the simulation ended with the benchmark


def test_run_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("bench_simulate refuses to simulate CUDA where it is real")
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nHand-written.\n", encoding="utf-8")
    monkeypatch.setattr(run_all, "PAGE", page)
    monkeypatch.setattr(bench_simulate, "GPT_SIZE", TINY_GPT)
    for _ in range(2):  # the second run replaces the first run's section in place
        run_all.main(["--only", "bench_simulate"])
        page.write_text(page.read_text(encoding="utf-8") + "\nKept below.\n", encoding="utf-8")
    out = capsys.readouterr().out
    assert out.count("\n== bench_simulate ==\n") == 2
    assert out.rstrip().endswith(f"Updated {page}")
    written = page.read_text(encoding="utf-8")
    assert written.startswith("# Benchmarks\n\nHand-written.\n\n## Recorded runs\n")
    assert written.count("<!-- run_all:bench_simulate:start -->") == 1
    assert written.count("Kept below.") == 2  # text after the section survives the rerun
    start = written.index("<!-- run_all:bench_simulate:start -->")
    end = written.index("<!-- run_all:bench_simulate:end -->")
    section = written[start:end]
    assert "`python -m benchmarks.bench_simulate` via `python -m benchmarks.run_all`, " in section
    table, _ = tables(section.split("```text\n")[1].split("```")[0])
    assert table.column("op") == list(bench_simulate.cases("cpu"))
    assert run_all.run_module("bench_that_does_not_exist") is None
