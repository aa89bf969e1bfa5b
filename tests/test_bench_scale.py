"""Smoke test of `benchmarks/bench_scale.py`: every structure and walker, at a tiny size.

No figure is checked against a number: the table is, for shape (a row per structure and walker,
numbers where numbers belong) and for arithmetic (each ratio agrees with the cells it is
computed from, to the rounding of the printed figures).
"""

from __future__ import annotations

import pytest

from benchmarks import bench_scale


def test_bench_scale_runs_every_walker_on_every_structure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench_scale.main(["--scale", "0.0002", "--repeat", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert headers == bench_scale.HEADERS
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(row[0], row[1]) for row in rows] == [
        (label.format(n=max(1, round(bench_scale.SIZES[key] * 0.0002))), walker)
        for key, (label, _) in bench_scale.STRUCTURES.items()
        for walker in bench_scale.WALKERS
    ]
    for row in rows:
        seconds, mib, time_ratio = float(row[2]), float(row[3]), float(row[4])
        assert seconds >= 0
        assert mib >= 0
        base = next(r for r in rows if r[0] == row[0] and r[1] == "to_device")
        if row[1] == "to_device":
            assert time_ratio == 1.0
        elif float(base[2]) > 0.01:  # enough digits printed to recompute the ratio
            assert time_ratio == pytest.approx(seconds / float(base[2]), rel=0.1, abs=0.02)
