"""What a default device adds to each torch call: `with torch.device(...)` vs `default_device`.

Run: `python -m benchmarks.bench_default_device [--rounds N]`

Every op is timed bare, inside `with torch.device("cpu")` and inside
`with devicekit.default_device("cpu")`, the three interleaved sample after sample (each sample a
batch of about 20 ms of calls) so that bursts of load from other jobs hit them alike; a figure
is the median over `--rounds` samples. Overhead is
the time minus the bare time, and the ratio is devicekit's overhead over torch's (at most 0.5 is
the target for non-factory ops; factory calls should not cost more than under torch).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import timeit
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

import devicekit
from benchmarks._timing import calls_per_batch, format_table


def _ops() -> dict[str, Callable[[], object]]:
    a, b = torch.ones(4), torch.ones(4)
    pieces = [torch.ones(1) for _ in range(4)]
    linear, x = torch.nn.Linear(64, 32), torch.ones(8, 64)
    return {
        "torch.add (4 elements)": lambda: torch.add(a, b),
        "a + b": lambda: a + b,
        "torch.cat (4 tensors)": lambda: torch.cat(pieces),
        "nn.Linear(64, 32) forward": lambda: linear(x),
        "factory: torch.zeros(4)": lambda: torch.zeros(4),
        "factory: torch.tensor([1.0, 2.0])": lambda: torch.tensor([1.0, 2.0]),
        "factory: nn.Linear(64, 32)": lambda: torch.nn.Linear(64, 32),
    }


def _settings() -> dict[str, Callable[[], AbstractContextManager[object]]]:
    return {
        "bare": contextlib.nullcontext,
        "torch": lambda: torch.device("cpu"),
        "devicekit": lambda: devicekit.default_device("cpu"),
    }


def measure(rounds: int) -> list[tuple[str, float, float, float, float]]:
    """Rows of (op, bare us, torch overhead us, devicekit overhead us, ratio)."""
    rows = []
    for name, op in _ops().items():
        # One batch size per op, from the bare op, so that every sample times the same work.
        number = calls_per_batch(op)
        samples: dict[str, list[float]] = {setting: [] for setting in _settings()}
        for _ in range(rounds):
            # Interleaved sample by sample: a burst of load from other jobs hits all three.
            for setting, enter in _settings().items():
                with enter():
                    samples[setting].append(timeit.timeit(op, number=number) / number * 1e6)
        bare = statistics.median(samples["bare"])
        torch_added = statistics.median(samples["torch"]) - bare
        devicekit_added = statistics.median(samples["devicekit"]) - bare
        ratio = devicekit_added / torch_added if torch_added > 0 else float("nan")
        rows.append((name, bare, torch_added, devicekit_added, ratio))
    return rows


def measure_blocks(rounds: int) -> list[tuple[str, float, float, float]]:
    """Rows of (what, torch us, devicekit us, ratio) for entering and leaving a block."""

    def torch_block() -> None:
        with torch.device("cpu"):
            pass

    block = devicekit.default_device("cpu")

    def devicekit_block() -> None:
        with block:
            pass

    rows = []
    outers: list[tuple[str, AbstractContextManager[object]]] = [
        ("outermost block", contextlib.nullcontext()),
        ("nested block", block),
    ]
    for what, outer in outers:
        times: dict[str, list[float]] = {"torch": [], "devicekit": []}
        with outer:
            for _ in range(rounds):
                for setting, enter_and_leave in (
                    ("torch", torch_block),
                    ("devicekit", devicekit_block),
                ):
                    times[setting].append(timeit.timeit(enter_and_leave, number=200) / 200 * 1e6)
        torch_us, devicekit_us = (statistics.median(times[k]) for k in ("torch", "devicekit"))
        rows.append((f"enter and leave, {what}", torch_us, devicekit_us, devicekit_us / torch_us))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=41)
    arguments = parser.parse_args(argv)
    # One intra-op thread: on a shared 2-core machine torch's two threads wait for each other,
    # and a Linear forward jumped from 20 us to 20 ms in runs with the default thread count.
    torch.set_num_threads(1)
    headers = ["op", "bare us", "torch.device overhead us", "devicekit overhead us", "ratio"]
    print(format_table(headers, measure(arguments.rounds)))
    print()
    headers = ["block", "torch.device us", "devicekit us", "ratio"]
    print(format_table(headers, measure_blocks(arguments.rounds)))


if __name__ == "__main__":
    main()
