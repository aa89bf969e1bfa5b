"""Timing helpers shared by the benchmarks: medians of repeats, ratios, plain-text tables.

Machines here are 2 cores and noisy: every figure is a median over repeats taken in one run, and
comparisons are ratios between things measured side by side, never absolute thresholds.

Every helper times batches of calls that last about `BATCH_S` seconds each. The smoke tests
(`tests/test_benchmarks.py`) lower it, so that each benchmark runs end to end in moments.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable, Sequence

#: How long one timed batch of calls lasts, in seconds.
BATCH_S = 0.02


def calls_per_batch(
    function: Callable[[], object],
    *,
    seconds: float | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> int:
    """How many calls of `function` last about `seconds` (default `BATCH_S`), at least one.

    Calibrated on a tenth of that: the batch grows tenfold until it lasts `seconds / 10`.
    """
    target = BATCH_S if seconds is None else seconds
    clock = timeit.Timer(function, timer=timer)
    number = 1
    while True:
        elapsed = clock.timeit(number)
        if elapsed >= target / 10:
            return max(1, round(number * target / elapsed))
        number *= 10


def median_us(function: Callable[[], object], *, repeat: int = 15) -> float:
    """Median microseconds per call of `function` over `repeat` timed batches."""
    number = calls_per_batch(function)
    samples = timeit.Timer(function).repeat(repeat=repeat, number=number)
    return statistics.median(samples) / number * 1e6


def median_cpu_us(function: Callable[[], object], *, repeat: int = 5) -> float:
    """Median CPU microseconds of this process per call of `function`, over `repeat` batches.

    Process CPU time is not inflated by busy neighbours on a shared machine, unlike wall time.
    """
    timer = timeit.Timer(function, timer=time.process_time)
    number = calls_per_batch(function, timer=time.process_time)
    return statistics.median(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def interleaved_median_us(
    functions: dict[str, Callable[[], object]], *, repeat: int = 15
) -> dict[str, float]:
    """Median microseconds per call of each function, timed in turns.

    Each round times every function once, so a burst of load from other processes hits all of
    them alike and the ratios between them stay meaningful on a shared, noisy machine.
    """
    numbers = {name: calls_per_batch(function) for name, function in functions.items()}
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            seconds = timeit.Timer(function).timeit(numbers[name])
            samples[name].append(seconds / numbers[name] * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable as plain text too) with floats to two decimals."""

    def cell(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    text_rows = [list(headers)] + [[cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in text_rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"
        for r in text_rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
