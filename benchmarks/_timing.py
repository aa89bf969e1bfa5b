"""Timing helpers shared by the benchmarks: medians of repeats, ratios, plain-text tables.

Machines here are 2 cores and noisy: every figure is a median over repeats taken in one run, and
comparisons are ratios between things measured side by side, never absolute thresholds.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable, Sequence


def median_us(function: Callable[[], object], *, repeat: int = 15, min_time: float = 0.02) -> float:
    """Median microseconds per call of `function` over `repeat` timed batches."""
    timer = timeit.Timer(function)
    number, _ = timer.autorange()
    number = max(1, int(number * min_time / 0.2))
    samples = timer.repeat(repeat=repeat, number=number)
    return statistics.median(samples) / number * 1e6


def median_cpu_us(function: Callable[[], object], *, repeat: int = 5) -> float:
    """Median CPU microseconds of this process per call of `function`, over `repeat` batches.

    Process CPU time is not inflated by busy neighbours on a shared machine, unlike wall time.
    """
    timer = timeit.Timer(function, timer=time.process_time)
    number, _ = timer.autorange()
    number = max(1, number // 10)
    return statistics.median(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def interleaved_median_us(
    functions: dict[str, Callable[[], object]], *, repeat: int = 15, min_time: float = 0.02
) -> dict[str, float]:
    """Median microseconds per call of each function, timed in turns.

    Each round times every function once, so a burst of load from other processes hits all of
    them alike and the ratios between them stay meaningful on a shared, noisy machine.
    """
    numbers = {}
    for name, function in functions.items():
        number, _ = timeit.Timer(function).autorange()
        numbers[name] = max(1, int(number * min_time / 0.2))
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
