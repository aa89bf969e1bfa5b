"""What `device_guard("error")` adds to a torch op, next to an empty torch function mode.

Run: `python -m benchmarks.bench_guard` (`--rounds N` for more or fewer rounds, `--threads N` to
set torch's CPU threads, 1 by default).

Each op runs in short batches (about 2 ms) under every condition: an empty `TorchFunctionMode`
(the cost torch charges any mode) followed by no mode, and `device_guard("error")` followed by
no mode again right after the guard has exited (devicekit should add nothing then). The batches
alternate, in a shuffled order, for many rounds, so load from other processes and slow drift hit
every condition alike; each figure is a median over rounds, and each difference or ratio is the
median of the ones taken within a round, between batches run milliseconds apart. Batches time
the CPU time of this process (`time.process_time`): the development machines are 2 shared cores,
where wall-clock time measures the queue as much as the code. CPU time still rises when the
other core is busy (the cores share caches), so the load average is printed with the figures.

Two references run in the same rounds, to show how far the guard is from what any check written
in Python costs here: an empty mode that calls the op without building a `kwargs` dict (part of
what the guard saves against the plain empty mode), and a bare check that does nothing but read
`.is_cpu` of each tensor argument (the least a device check can do; it is not a correct guard).

A last table calls the handlers directly on a no-op op: the check's own cost without a kernel
and torch's dispatch around it, which is steadier, and lower, than the same check in place.

Two tables give provenance's cost (issue 15): the guard recording factories and moves against
the same guard with recording off, and a simulation's factories with recording on and off
(`devicekit._provenance.made` replaced by a function that records nothing), inside one
`simulated_devices("cuda", 1)`.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import devicekit
from benchmarks import _timing
from benchmarks._timing import format_table

_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter


class EmptyMode(TorchFunctionMode):
    """A torch function mode that does nothing, written the usual way."""

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


class LeanEmptyMode(TorchFunctionMode):
    """An empty mode that calls the op without building a `kwargs` dict, as the guard does."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return func(*args, **kwargs) if kwargs else func(*args)


class BareCheckMode(TorchFunctionMode):
    """The least a device check can do: read `.is_cpu` of each tensor argument (and of those in
    a list or tuple). Only right for CPU tensors in positional arguments: a floor, not a guard."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        for arg in args:
            kind = type(arg)
            if kind is _Tensor or kind is _Parameter:
                if not arg.is_cpu:
                    raise RuntimeError("the bare check only knows CPU tensors")
            elif kind is list or kind is tuple:
                for item in arg:
                    if isinstance(item, _Tensor) and not item.is_cpu:
                        raise RuntimeError("the bare check only knows CPU tensors")
        return func(*args, **kwargs) if kwargs else func(*args)


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


#: The conditions an op is timed under, each entered around a whole batch.
CONDITIONS: dict[str, Callable[[], AbstractContextManager[object]]] = {
    "none": nullcontext,
    "empty": EmptyMode,
    "guard": lambda: devicekit.device_guard("error"),
    "lean": LeanEmptyMode,
    "bare": BareCheckMode,
}
#: The batches of a round, in shuffled units: a unit's batches run one right after the other.
#: "after" times the op with no mode right after the guard has exited; "none" follows the empty
#: mode the same way, so that both are the second batch of a unit.
UNITS = (("empty", "none"), ("guard", "after"), ("lean",), ("bare",))


def batch_us(function: Callable[[], object], number: int) -> float:
    """Process CPU microseconds per call of `function`, over `number` calls in a row."""
    loop = range(number)
    enabled = gc.isenabled()
    gc.disable()  # as `timeit` does: a collection would land in one batch at random
    try:
        start = time.process_time()
        for _ in loop:
            function()
        return (time.process_time() - start) / number * 1e6
    finally:
        if enabled:
            gc.enable()


def calls_per_batch(function: Callable[[], object]) -> int:
    """How many calls of `function` make a batch of a tenth of `_timing.BATCH_S` (about 2 ms)
    of process CPU time."""
    return _timing.calls_per_batch(function, seconds=_timing.BATCH_S / 10, timer=time.process_time)


def alternate(
    functions: dict[str, Callable[[], object]], rounds: int, seed: int
) -> dict[str, dict[str, list[float]]]:
    """Per function, per condition, the microseconds per call of each round's batch.

    Each round times the `UNITS` in a shuffled order; "after" is timed with no mode.
    """
    rng = random.Random(seed)
    results: dict[str, dict[str, list[float]]] = {}
    for name, function in functions.items():
        number = calls_per_batch(function)
        samples: dict[str, list[float]] = {key: [] for unit in UNITS for key in unit}
        for context in CONDITIONS.values():  # warm up every path
            with context():
                batch_us(function, number)
        for _ in range(rounds):
            for unit in rng.sample(UNITS, len(UNITS)):
                for key in unit:
                    with CONDITIONS.get(key, nullcontext)():
                        samples[key].append(batch_us(function, number))
        results[name] = samples
    return results


def paired(samples: dict[str, list[float]], key: str, base: str) -> float:
    """The median, over rounds, of `key - base` within a round."""
    return statistics.median(k - b for k, b in zip(samples[key], samples[base], strict=True))


def ratio(samples: dict[str, list[float]], key: str, base: str) -> str:
    """The median, over rounds, of `key / base` within a round, as `1.23x`."""
    ratios = (k / b for k, b in zip(samples[key], samples[base], strict=True))
    return f"{statistics.median(ratios):.2f}x"


def middle_half(samples: dict[str, list[float]], key: str, base: str) -> str:
    """The interquartile range of `key - base` over rounds: how much the difference moves."""
    differences = [k - b for k, b in zip(samples[key], samples[base], strict=True)]
    if len(differences) < 2:
        return "-"
    low, _, high = statistics.quantiles(differences, n=4)
    return f"{low:.2f} to {high:.2f}"


def in_place_tables(rounds: int, seed: int = 0) -> tuple[str, str]:
    """The issue's table (the four ops under each condition) and the references table."""
    results = alternate(cases(), rounds, seed)
    main_rows, reference_rows = [], []
    for name, samples in results.items():
        main_rows.append(
            [
                name,
                statistics.median(samples["none"]),
                statistics.median(samples["empty"]),
                statistics.median(samples["guard"]),
                statistics.median(samples["after"]),
                paired(samples, "guard", "empty"),
                middle_half(samples, "guard", "empty"),
                ratio(samples, "guard", "none"),
                ratio(samples, "empty", "none"),
            ]
        )
        reference_rows.append(
            [
                name,
                paired(samples, "guard", "empty"),
                paired(samples, "lean", "empty"),
                paired(samples, "bare", "empty"),
                paired(samples, "guard", "bare"),
                paired(samples, "after", "none"),
            ]
        )
    main = format_table(
        [
            "op",
            "no mode",
            "empty mode",
            "device_guard",
            "after guard",
            "guard - empty",
            "guard - empty, middle half",
            "guard / none",
            "empty / none",
        ],
        main_rows,
    )
    references = format_table(
        [
            "op",
            "guard - empty",
            "lean empty - empty",
            "bare check - empty",
            "guard - bare check",
            "after guard - none",
        ],
        reference_rows,
    )
    return main, references


@contextmanager
def _active_guard_state() -> Iterator[None]:
    """The guard's state as `device_guard("error")` sets it, without pushing its mode."""
    from devicekit import _guard

    token = _guard._ACTIVE_GUARD.set(_guard._GuardState("error", None))
    try:
        yield
    finally:
        _guard._ACTIVE_GUARD.reset(token)


def check_alone(rounds: int, seed: int = 0) -> str:
    """The guard's handler against an empty mode's, called directly on a no-op op."""
    from devicekit import _guard

    x, w, b = torch.ones(8, 64), torch.ones(32, 64), torch.ones(32)
    linear = torch.nn.Linear(64, 32)
    on_meta = [torch.ones(2, device="meta") for _ in range(3)]
    shapes: dict[str, tuple[tuple[Any, ...], dict[str, Any] | None]] = {
        "1 tensor": ((x,), None),
        "2 tensors": ((x, w), None),
        "3 tensors": ((x, w, b), None),
        "3 tensors, 2 nn.Parameters": ((x, linear.weight, linear.bias), None),
        "4 tensors in a list": (([x, x, x, x],), None),
        "2 tensors and a keyword": ((x, w), {"alpha": 2}),
        "3 tensors, 2 of them keywords": ((x,), {"weight": w, "bias": b}),
        "3 tensors on meta (reads .device)": (tuple(on_meta), None),
    }

    def noop(*args: object, **kwargs: object) -> None:
        return None

    handlers = {
        "empty": EmptyMode().__torch_function__,
        "guard": _guard._DeviceGuardMode().__torch_function__,
    }
    functions = {
        f"{shape}|{handler}": (
            lambda h=handlers[handler], a=args, k=kwargs: h(noop, (), a, k)  # type: ignore[misc]
        )
        for shape, (args, kwargs) in shapes.items()
        for handler in handlers
    }
    rng = random.Random(seed)
    numbers = {key: calls_per_batch(function) for key, function in functions.items()}
    samples: dict[str, list[float]] = {key: [] for key in functions}
    with _active_guard_state():
        for _ in range(rounds):
            for shape in shapes:
                order = list(handlers)
                rng.shuffle(order)
                for handler in order:
                    key = f"{shape}|{handler}"
                    samples[key].append(batch_us(functions[key], numbers[key]))
    rows = []
    for shape in shapes:
        pair = {"empty": samples[f"{shape}|empty"], "guard": samples[f"{shape}|guard"]}
        rows.append(
            [
                shape,
                statistics.median(pair["empty"]),
                statistics.median(pair["guard"]),
                paired(pair, "guard", "empty"),
            ]
        )
    return format_table(["tensor arguments", "empty mode", "device_guard", "guard - empty"], rows)


@contextmanager
def _recording_off() -> Iterator[None]:
    """The guard as it was before provenance (issue 15): it records no factory or move."""
    from devicekit import _guard

    saved = _guard._RECORDED
    _guard._RECORDED = frozenset()
    try:
        yield
    finally:
        _guard._RECORDED = saved


@contextmanager
def _guarded(*, recording: bool) -> Iterator[None]:
    """A `device_guard("error")`, recording provenance or not."""
    with nullcontext() if recording else _recording_off(), devicekit.device_guard("error"):
        yield


def _shuffled_rounds(
    function: Callable[[], object],
    conditions: dict[str, Callable[[], AbstractContextManager[object]]],
    rounds: int,
    rng: random.Random,
) -> dict[str, list[float]]:
    """Per condition, the microseconds per call of each round's batch of `function`; each
    round times the conditions in a shuffled order."""
    number = calls_per_batch(function)
    samples: dict[str, list[float]] = {key: [] for key in conditions}
    for _ in range(rounds):
        for key in rng.sample(list(conditions), len(conditions)):
            with conditions[key]():
                samples[key].append(batch_us(function, number))
    return samples


def provenance_cost(rounds: int, seed: int = 0) -> str:
    """What recording provenance adds to the guard: ops run in place under `device_guard` with
    recording on, and with it off (the guard before issue 15), in alternating batches."""
    a, b = torch.ones(4), torch.ones(4)
    x = torch.ones(8, 64)
    linear = torch.nn.Linear(64, 32)
    ops: dict[str, Callable[[], object]] = {
        "a + b (no factory)": lambda: a + b,
        "nn.Linear(64, 32) forward": lambda: linear(x),
        "torch.zeros(8) (a factory)": lambda: torch.zeros(8),
        "torch.arange(16) (a factory)": lambda: torch.arange(16),
        "x.to(torch.float64) (a move)": lambda: x.to(torch.float64),
    }
    conditions: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "none": nullcontext,
        "off": lambda: _guarded(recording=False),
        "on": lambda: _guarded(recording=True),
    }
    rng = random.Random(seed)
    rows = []
    for name, function in ops.items():
        samples = _shuffled_rounds(function, conditions, rounds, rng)
        rows.append(
            [
                name,
                statistics.median(samples["none"]) * 1000,
                statistics.median(samples["off"]) * 1000,
                statistics.median(samples["on"]) * 1000,
                paired(samples, "on", "off") * 1000,
                ratio(
                    {
                        "on": [o - n for o, n in zip(samples["on"], samples["none"], strict=True)],
                        "off": [
                            max(f - n, 1e-9)
                            for f, n in zip(samples["off"], samples["none"], strict=True)
                        ],
                    },
                    "on",
                    "off",
                ),
            ]
        )
    return format_table(
        [
            "op",
            "no guard (ns)",
            "guard, recording off (ns)",
            "guard (ns)",
            "recording adds (ns)",
            "guard cost with / without recording",
        ],
        rows,
    )


@contextmanager
def _simulated_recording_off() -> Iterator[None]:
    """A simulation as it would be without provenance: its factories record nothing."""
    from devicekit import _provenance

    def made(func: object, result: object, device: object = None) -> object:
        return result

    saved = _provenance.made
    _provenance.made = made  # type: ignore[assignment]
    try:
        yield
    finally:
        _provenance.made = saved


def simulated_provenance_cost(rounds: int, seed: int = 0) -> str:
    """What recording provenance adds under `simulated_devices("cuda", 1)`: factories on the
    CPU and on the simulated device, and an op on simulated tensors (no factory), with
    recording on and off in alternating batches inside one simulation."""
    conditions: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "off": _simulated_recording_off,
        "on": nullcontext,
    }
    rng = random.Random(seed)
    rows = []
    with devicekit.simulated_devices("cuda", 1):
        a, b = torch.ones(4, device="cuda"), torch.ones(4, device="cuda")
        ops: dict[str, Callable[[], object]] = {
            "a + b on cuda:0 (no factory)": lambda: a + b,
            "torch.zeros(8) (CPU factory)": lambda: torch.zeros(8),
            'torch.zeros(8, device="cuda")': lambda: torch.zeros(8, device="cuda"),
            'torch.arange(16, device="cuda")': lambda: torch.arange(16, device="cuda"),
        }
        for name, function in ops.items():
            samples = _shuffled_rounds(function, conditions, rounds, rng)
            rows.append(
                [
                    name,
                    statistics.median(samples["off"]) * 1000,
                    statistics.median(samples["on"]) * 1000,
                    paired(samples, "on", "off") * 1000,
                    ratio(samples, "on", "off"),
                ]
            )
    return format_table(
        [
            "op under simulated_devices",
            "recording off (ns)",
            "recording on (ns)",
            "recording adds (ns)",
            "on / off",
        ],
        rows,
    )


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument("--rounds", type=int, default=150, help="alternating rounds (150)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    load_before = _load()
    main_table, references = in_place_tables(options.rounds)
    alone = check_alone(max(1, options.rounds // 2))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
        f"{options.rounds} alternating rounds, load average {load_before} before and "
        f"{_load()} after; process CPU time in us per call, medians over rounds; differences "
        "and ratios are medians of those within a round"
    )
    print(main_table)
    print()
    print(
        "References in the same rounds: an empty mode that builds no kwargs dict (lean), "
        "and a bare check that only reads .is_cpu of each tensor (a floor, not a guard)"
    )
    print(references)
    print()
    print("The check alone: one handler call on a no-op op, process CPU time in us")
    print(alone)
    print()
    print(
        "Provenance (issue 15): the guard recording factory calls and moves, against the same "
        "guard with recording off; ns per call, medians over rounds"
    )
    print(provenance_cost(max(1, options.rounds // 3)))
    print()
    print(
        "Provenance under a simulation: the same ops with factory recording on and off, "
        "inside one simulated_devices('cuda', 1); ns per call, medians over rounds"
    )
    print(simulated_provenance_cost(max(1, options.rounds // 3)))


if __name__ == "__main__":
    main()
