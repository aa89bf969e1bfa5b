"""Every walker at scale: time and peak memory of `to_device`, `devices_of`, `find_device` and
`colocate` on very large, very deep and very long structures.

    python -m benchmarks.bench_scale               # the full sizes (about 2 GiB, a few minutes)
    python -m benchmarks.bench_scale --scale 0.1   # a tenth of every size

The structures: a dict of 1,000,000 tensors; 100,000 levels of nested dicts; a linked chain of
100,000 dataclass nodes, each holding a tensor; and a cycle closed through 100,000 tuples. Each
walker must be linear in the size, and the reporting walkers (`devices_of`, `find_device`,
`colocate`) within about twice `to_device`'s time and memory: the columns `x to_device` are those
ratios. `to_device` moves to `meta` (one real dispatch per tensor); `colocate` finds every
tensor on the CPU and so moves nothing.

Time is the median of `--repeat` calls, each timed alone with the garbage collector paused
(as `timeit` does: a collection that the walk did not cause would otherwise land on it); peak
memory is what `tracemalloc` saw allocated from Python during one more call (tensor data and
torch's C++ allocations are not counted, the walkers' own bookkeeping is).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import torch

import devicekit
from benchmarks._timing import format_table

#: The full sizes; `--scale` multiplies them.
SIZES = {"dict": 1_000_000, "nesting": 100_000, "chain": 100_000, "cycle": 100_000}
META = torch.device("meta")


@dataclasses.dataclass
class Node:
    value: torch.Tensor
    next: Any = None


def _dict(size: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.zeros(1) for i in range(size)}


def _nesting(size: int) -> Any:
    nested: Any = torch.zeros(1)
    for _ in range(size):
        nested = {"k": nested}
    return nested


def _chain(size: int) -> Node | None:
    head = None
    for _ in range(size):
        head = Node(torch.zeros(1), head)
    return head


def _cycle(size: int) -> list[Any]:
    """A list holding a tensor and a chain of `size` tuples whose last holds the list again."""
    root: list[Any] = [torch.zeros(1)]
    link: Any = root
    for _ in range(size):
        link = (link,)
    root.append(link)
    return root


STRUCTURES: dict[str, tuple[str, Callable[[int], Any]]] = {
    "dict": ("dict of {n:,} tensors", _dict),
    "nesting": ("{n:,} nested dicts", _nesting),
    "chain": ("chain of {n:,} dataclass nodes", _chain),
    "cycle": ("cycle through {n:,} tuples", _cycle),
}

WALKERS: dict[str, Callable[[Any], object]] = {
    "to_device": lambda obj: devicekit.to_device(obj, META),
    "devices_of": devicekit.devices_of,
    "find_device": devicekit.find_device,
    "colocate": devicekit.colocate,
}


def _seconds(function: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return statistics.median(samples)


def _peak_mib(function: Callable[[], object]) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def measure(scale: float, repeat: int) -> list[list[object]]:
    """One row per structure and walker: seconds, peak MiB, and both as multiples of
    `to_device`'s on the same structure."""
    rows: list[list[object]] = []
    for key, (label, make) in STRUCTURES.items():
        size = max(1, round(SIZES[key] * scale))
        obj = make(size)
        figures = {}
        for name, walker in WALKERS.items():
            call = lambda walker=walker, obj=obj: walker(obj)  # noqa: E731
            figures[name] = (_seconds(call, repeat), _peak_mib(call))
        base_s, base_mib = figures["to_device"]
        for name, (seconds, mib) in figures.items():
            rows.append(
                [
                    label.format(n=size),
                    name,
                    f"{seconds:.3f}",
                    f"{mib:.1f}",
                    f"{seconds / base_s:.2f}",
                    f"{mib / base_mib:.2f}" if base_mib else "-",
                ]
            )
    return rows


HEADERS = ["structure", "walker", "seconds", "peak MiB", "x to_device time", "x to_device memory"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size by this")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per cell")
    args = parser.parse_args(argv)
    print(format_table(HEADERS, measure(args.scale, args.repeat)))


if __name__ == "__main__":
    main()
