"""What `device_guard("error")` adds to a torch op, next to an empty torch function mode.

Run: `python -m benchmarks.bench_guard` (add `--threads N` to set torch's CPU threads).

Every op is timed three ways in one run, interleaved so that load from other processes hits all
three alike: with no mode at all, inside an empty `TorchFunctionMode` (the cost torch charges any
mode), and inside `device_guard("error")`. The last columns are the guard's cost over the empty
mode, in microseconds and as a ratio of the op with no mode. A fourth column times the op again
after the guard has exited, to show that devicekit adds nothing once no guard is active.

The development machines are 2 shared cores, often with a load average above 2: wall-clock
figures there measure the queue as much as the code. So this benchmark times the CPU time of
this process (`time.process_time`, with torch on one thread by default), which a busy neighbour
does not inflate; every figure is the median of the medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import devicekit
from benchmarks._timing import format_table, median_cpu_us


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
        plain.append(median_cpu_us(function))
        with EmptyMode():
            empty.append(median_cpu_us(function))
        with devicekit.device_guard("error"):
            guarded.append(median_cpu_us(function))
        after.append(median_cpu_us(function))
    return tuple(statistics.median(v) for v in (plain, empty, guarded, after))  # type: ignore[return-value]


def check_alone(repeat: int) -> list[list[object]]:
    """The guard's handler against an empty mode's, called directly on a no-op op: the check's
    own cost, without the kernel and torch's dispatch around it (steadier than the rows above)."""
    from devicekit import _guard

    x, w, b = torch.ones(8, 64), torch.ones(32, 64), torch.ones(32)
    linear = torch.nn.Linear(64, 32)
    calls: dict[str, tuple[Any, ...]] = {
        "1 tensor": (x,),
        "2 tensors": (x, w),
        "3 tensors": (x, w, b),
        "3 tensors, 2 nn.Parameters": (x, linear.weight, linear.bias),
        "4 tensors in a list": ([x, x, x, x],),
    }

    def noop(*args: object, **kwargs: object) -> None:
        return None

    guard_mode, empty_mode = _guard._DeviceGuardMode(), EmptyMode()
    rows: list[list[object]] = []
    # The guard's state, as `device_guard("error")` sets it, without pushing its mode.
    active = _guard._ACTIVE_GUARD.set(_guard._GuardState("error", None))
    try:
        for name, args in calls.items():
            guarded = statistics.median(
                median_cpu_us(lambda a=args: guard_mode.__torch_function__(noop, (), a))
                for _ in range(repeat)
            )
            empty = statistics.median(
                median_cpu_us(lambda a=args: empty_mode.__torch_function__(noop, (), a))
                for _ in range(repeat)
            )
            rows.append([name, empty, guarded, guarded - empty])
    finally:
        _guard._ACTIVE_GUARD.reset(active)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per op")
    options = parser.parse_args(argv)
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
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
        "medians of process CPU time in us"
    )
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
    print()
    print("The check alone: one handler call on a no-op op, medians of process CPU time in us")
    print(
        format_table(
            ["tensor arguments", "empty mode", "device_guard", "guard - empty"],
            check_alone(options.rounds),
        )
    )


if __name__ == "__main__":
    main()
