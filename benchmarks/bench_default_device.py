"""What a default device adds to each torch call: `with torch.device(...)` vs `default_device`.

Run: `python -m benchmarks.bench_default_device [--rounds N]`

Every op is timed bare, inside `with torch.device("cpu")` and inside
`with devicekit.default_device("cpu")`, the three interleaved round after round so that machine
noise hits them alike; a figure is the median over rounds of each round's median. Overhead is
the time minus the bare time, and the ratio is devicekit's overhead over torch's (at most 0.5 is
the target for non-factory ops; factory calls should not cost more than under torch).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

import devicekit
from benchmarks._timing import format_table, median_us


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


def _time(op: Callable[[], object], setting: str) -> float:
    if setting == "torch":
        with torch.device("cpu"):
            return median_us(op, repeat=5)
    if setting == "devicekit":
        with devicekit.default_device("cpu"):
            return median_us(op, repeat=5)
    return median_us(op, repeat=5)


def measure(rounds: int) -> list[tuple[str, float, float, float, float]]:
    """Rows of (op, bare us, torch overhead us, devicekit overhead us, ratio)."""
    rows = []
    for name, op in _ops().items():
        times: dict[str, list[float]] = {"bare": [], "torch": [], "devicekit": []}
        for _ in range(rounds):
            for setting, samples in times.items():
                samples.append(_time(op, setting))
        bare = statistics.median(times["bare"])
        torch_added = statistics.median(times["torch"]) - bare
        devicekit_added = statistics.median(times["devicekit"]) - bare
        ratio = devicekit_added / torch_added if torch_added > 0 else float("nan")
        rows.append((name, bare, torch_added, devicekit_added, ratio))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    arguments = parser.parse_args()
    headers = ["op", "bare us", "torch.device overhead us", "devicekit overhead us", "ratio"]
    print(format_table(headers, measure(arguments.rounds)))


if __name__ == "__main__":
    main()
