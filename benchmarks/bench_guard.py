"""What `device_guard("error")` adds to a torch op, next to an empty torch function mode.

Run: `python -m benchmarks.bench_guard` (add `--threads N` to set torch's CPU threads).

Every op is timed three ways in one run, interleaved so that load from other processes hits all
three alike: with no mode at all, inside an empty `TorchFunctionMode` (the cost torch charges any
mode), and inside `device_guard("error")`. The last columns are the guard's cost over the empty
mode, in microseconds and as a ratio of the op with no mode. A fourth column times the op again
after the guard has exited, to show that devicekit adds nothing once no guard is active.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import devicekit
from benchmarks._timing import format_table, median_us


class EmptyMode(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        return func(*args, **kwargs)


def cases() -> dict[str, Callable[[], object]]:
    a, b = torch.ones(4), torch.ones(4)
    parts = [torch.ones(4) for _ in range(4)]
    linear, x = torch.nn.Linear(64, 32), torch.ones(8, 64)
    return {
        "torch.add(a, b), 4 elements": lambda: torch.add(a, b),
        "a + b, 4 elements": lambda: a + b,
        "torch.cat of 4 tensors": lambda: torch.cat(parts),
        "nn.Linear(64, 32) forward, batch 8": lambda: linear(x),
    }


def measure(function: Callable[[], object], rounds: int) -> tuple[float, float, float, float]:
    plain, empty, guarded, after = [], [], [], []
    for _ in range(rounds):
        plain.append(median_us(function, repeat=5))
        with EmptyMode():
            empty.append(median_us(function, repeat=5))
        with devicekit.device_guard("error"):
            guarded.append(median_us(function, repeat=5))
        after.append(median_us(function, repeat=5))
    return tuple(statistics.median(v) for v in (plain, empty, guarded, after))  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per op")
    options = parser.parse_args(argv)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    rows = []
    for name, function in cases().items():
        plain, empty, guarded, after = measure(function, options.rounds)
        rows.append(
            [
                name,
                plain,
                empty,
                guarded,
                after,
                guarded - empty,
                f"{guarded / plain:.2f}x",
                f"{empty / plain:.2f}x",
            ]
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, medians in us")
    headers = [
        "op",
        "no mode",
        "empty mode",
        "device_guard",
        "after guard",
        "guard - empty",
        "guard / none",
        "empty / none",
    ]
    print(format_table(headers, rows))


if __name__ == "__main__":
    main()
