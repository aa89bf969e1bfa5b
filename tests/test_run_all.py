"""`benchmarks/run_all.py` keeps hand-written docs and replaces only its own sections."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from benchmarks import bench_transfer, run_all


def test_a_new_section_is_appended_under_recorded_runs() -> None:
    page = "# Benchmarks\n\nHand-written.\n"
    updated = run_all.update_page(page, "bench_x", run_all.section("bench_x", "t1\n", when="now"))
    assert updated.startswith(page)
    assert "## Recorded runs" in updated
    assert "### `bench_x`" in updated
    assert "```text\nt1\n```" in updated


def test_a_known_section_is_replaced_in_place() -> None:
    first = run_all.update_page("# B\n", "bench_x", run_all.section("bench_x", "old", when="a"))
    page = first + "\nMore hand-written text.\n"
    updated = run_all.update_page(page, "bench_x", run_all.section("bench_x", "new", when="b"))
    assert "old" not in updated
    assert "new" in updated
    assert updated.endswith("\nMore hand-written text.\n")
    assert updated.count("run_all:bench_x:start") == 1


def test_the_plot_is_shown_only_when_drawn() -> None:
    assert "![" not in run_all.section("bench_transfer", "t", when="now")
    shown = run_all.section("bench_transfer", "t", when="now", plot=run_all.PLOT)
    assert "](transfer-throughput.png)" in shown


def test_a_benchmark_runs_with_its_own_arguments_and_its_output_is_captured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = types.ModuleType("benchmarks.bench_fake")
    module.main = lambda: print("table", sys.argv[1:])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "benchmarks.bench_fake", module)
    argv = list(sys.argv)
    assert run_all.run_module("bench_fake", ["--plot", "x.png"]) == "table ['--plot', 'x.png']\n"
    assert sys.argv == argv
    assert capsys.readouterr().out == ""


def test_a_missing_benchmark_is_skipped() -> None:
    assert run_all.run_module("bench_that_does_not_exist") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_the_gpu_section_says_why_it_is_skipped() -> None:
    message = bench_transfer.gpu_section()
    assert message.startswith("GPU section skipped: CUDA is not available here")
