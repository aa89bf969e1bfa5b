"""The race corpus: stream races people ship, each with its fix, run under the race finder.

Run: `python -m benchmarks.race_corpus [--rounds N]`.

Each pattern is a small function written the way it appears in real training code (a
home-made prefetcher, a staging buffer, a host read of a `non_blocking` copy) and its fixed
version. Both run under `simulated_devices(..., races=True)`: a race is *found* when the buggy
version raises `RaceError` or returns other values than it does without the race finder; a
*false alarm* is a fixed version that does either. The script prints one row per pattern, then
what the race finder costs per op (the same ops with `races=True` and without).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import devicekit
from benchmarks._timing import format_table, median_cpu_us

Values = list[float]


@dataclass(frozen=True)
class Pattern:
    """One race and its fix: functions that run inside a simulation and return host values."""

    name: str
    what: str
    buggy: Callable[[], Values]
    fixed: Callable[[], Values]
    device_type: str = "cuda"


def _batches(count: int = 3, size: int = 4) -> list[torch.Tensor]:
    return [torch.arange(size, dtype=torch.float32) + 10 * step for step in range(count)]


# --- 1. a non_blocking copy to the host, read before any wait ----------------------------------


def d2h_read_before_sync() -> Values:
    logits = torch.arange(6.0, device="cuda").softmax(0)
    host = logits.to("cpu", non_blocking=True)
    return [float(host.argmax())]  # the host reads it at once


def d2h_read_before_sync_fixed() -> Values:
    logits = torch.arange(6.0, device="cuda").softmax(0)
    host = logits.to("cpu", non_blocking=True)
    torch.cuda.synchronize()
    return [float(host.argmax())]


# --- 2. .tolist() of a non_blocking copy to the host -------------------------------------------


def tolist_of_nonblocking_copy() -> Values:
    counts = torch.bincount(torch.tensor([0, 1, 1, 3], device="cuda"), minlength=4)
    return [float(v) for v in counts.to("cpu", non_blocking=True).tolist()]


def tolist_of_nonblocking_copy_fixed() -> Values:
    counts = torch.bincount(torch.tensor([0, 1, 1, 3], device="cuda"), minlength=4)
    host = counts.to("cpu", non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return [float(v) for v in host.tolist()]


# --- 3. non_blocking .to("cpu") then .numpy() ---------------------------------------------------


def numpy_of_nonblocking_copy() -> Values:
    embeddings = torch.ones(2, 3, device="cuda") * 0.5
    array = embeddings.to("cpu", non_blocking=True).numpy()
    return [float(array.sum())]


def numpy_of_nonblocking_copy_fixed() -> Values:
    embeddings = torch.ones(2, 3, device="cuda") * 0.5
    host = embeddings.to("cpu", non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return [float(host.numpy().sum())]


# --- 4. copy_ into a pinned host buffer, read before the event ---------------------------------


def pinned_copy_read_early() -> Values:
    metrics = torch.tensor([0.25, 0.5], device="cuda")
    host = torch.empty(2, pin_memory=True)
    host.copy_(metrics, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host.tolist()  # the event is never waited for


def pinned_copy_read_early_fixed() -> Values:
    metrics = torch.tensor([0.25, 0.5], device="cuda")
    host = torch.empty(2, pin_memory=True)
    host.copy_(metrics, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    ready.synchronize()
    return host.tolist()


# --- 5. MPS: a non_blocking copy to the host (pytorch#139550, #140296) --------------------------


def mps_nonblocking_host_copy() -> Values:
    x = torch.linspace(0, 1, 5, device="mps")
    return x.to("cpu", non_blocking=True).tolist()


def mps_nonblocking_host_copy_fixed() -> Values:
    x = torch.linspace(0, 1, 5, device="mps")
    host = x.to("cpu", non_blocking=True)
    torch.mps.synchronize()
    return host.tolist()


# --- 6. a home-made prefetcher without wait_stream ----------------------------------------------


class _Prefetcher:
    """The prefetcher of many training scripts: copies the next batch on a side stream."""

    def __init__(self, batches: list[torch.Tensor], *, wait: bool, record: bool) -> None:
        self.batches: Iterator[torch.Tensor] = iter(batches)
        self.stream = torch.cuda.Stream()
        self.wait, self.record = wait, record
        self.next: torch.Tensor | None = None
        self.preload()

    def preload(self) -> None:
        batch = next(self.batches, None)
        if batch is None:
            self.next = None
            return
        with torch.cuda.stream(self.stream):
            self.next = batch.pin_memory().cuda(non_blocking=True)

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> torch.Tensor:
        if self.wait:
            torch.cuda.current_stream().wait_stream(self.stream)
        batch = self.next
        if batch is None:
            raise StopIteration
        if self.record:
            batch.record_stream(torch.cuda.current_stream())
        self.preload()
        return batch


def _train(prefetcher: _Prefetcher) -> Values:
    total = torch.zeros((), device="cuda")
    for batch in prefetcher:
        total += (batch * 2).sum()
    return [total.item()]


def prefetcher_without_wait_stream() -> Values:
    return _train(_Prefetcher(_batches(), wait=False, record=True))


def prefetcher_without_wait_stream_fixed() -> Values:
    return _train(_Prefetcher(_batches(), wait=True, record=True))


# --- 7. the same prefetcher without record_stream (torchrec#4191) -------------------------------


def prefetcher_without_record_stream() -> Values:
    return _train(_Prefetcher(_batches(), wait=True, record=False))


def prefetcher_without_record_stream_fixed() -> Values:
    return prefetcher_without_wait_stream_fixed()


# --- 8. one pinned staging buffer refilled before its copy is done ------------------------------


def staging_buffer_reused_early() -> Values:
    staging = torch.empty(4, pin_memory=True)
    on_device = []
    for batch in _batches():
        staging.copy_(batch)  # the previous copy out of `staging` may still be reading it
        on_device.append(staging.to("cuda", non_blocking=True))
    return [float(t.sum()) for t in on_device]


def staging_buffer_reused_early_fixed() -> Values:
    staging = torch.empty(4, pin_memory=True)
    copied: torch.cuda.Event | None = None
    on_device = []
    for batch in _batches():
        if copied is not None:
            copied.synchronize()
        staging.copy_(batch)
        on_device.append(staging.to("cuda", non_blocking=True))
        copied = torch.cuda.Event()
        copied.record()
    return [float(t.sum()) for t in on_device]


# --- 9. the event recorded on the wrong stream --------------------------------------------------


def event_on_wrong_stream() -> Values:
    side = torch.cuda.Stream()
    ready = torch.cuda.Event()
    source = torch.full((3,), 7.0).pin_memory()
    with torch.cuda.stream(side):
        batch = source.to("cuda", non_blocking=True)
    ready.record()  # recorded on the current (default) stream, not on `side`
    torch.cuda.current_stream().wait_event(ready)
    return [float(batch.mean())]


def event_on_wrong_stream_fixed() -> Values:
    side = torch.cuda.Stream()
    ready = torch.cuda.Event()
    source = torch.full((3,), 7.0).pin_memory()
    with torch.cuda.stream(side):
        batch = source.to("cuda", non_blocking=True)
        ready.record(side)
    torch.cuda.current_stream().wait_event(ready)
    return [float(batch.mean())]


# --- 10. side-stream compute used without current_stream().wait_stream --------------------------


def side_compute_without_wait() -> Values:
    side = torch.cuda.Stream()
    weights = torch.ones(4, 4, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        features = weights @ torch.arange(4.0, device="cuda")
    return [float((features + 1).sum())]


def side_compute_without_wait_fixed() -> Values:
    side = torch.cuda.Stream()
    weights = torch.ones(4, 4, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        features = weights @ torch.arange(4.0, device="cuda")
    torch.cuda.current_stream().wait_stream(side)
    return [float((features + 1).sum())]


# --- 11. a side-stream copy_ into a device buffer, read by the default stream -------------------


def side_copy_read_by_default() -> Values:
    side = torch.cuda.Stream()
    buffer = torch.empty(4, device="cuda")
    source = torch.arange(4.0).pin_memory()
    with torch.cuda.stream(side):
        buffer.copy_(source, non_blocking=True)
    return [float(buffer.square().sum())]


def side_copy_read_by_default_fixed() -> Values:
    side = torch.cuda.Stream()
    buffer = torch.empty(4, device="cuda")
    source = torch.arange(4.0).pin_memory()
    side.wait_stream(torch.cuda.current_stream())  # `buffer` was made on the default stream
    with torch.cuda.stream(side):
        buffer.copy_(source, non_blocking=True)
    torch.cuda.current_stream().wait_stream(side)
    return [float(buffer.square().sum())]


# --- 12. double buffering with one event --------------------------------------------------------


def double_buffering_one_event() -> Values:
    side = torch.cuda.Stream()
    buffers = [torch.empty(4, device="cuda") for _ in range(2)]
    ready = torch.cuda.Event()
    total = torch.zeros((), device="cuda")
    for step, batch in enumerate(_batches(4)):
        slot = buffers[step % 2]
        with torch.cuda.stream(side):  # may overwrite `slot` while the default stream reads it
            slot.copy_(batch.pin_memory(), non_blocking=True)
            ready.record()
        torch.cuda.current_stream().wait_event(ready)
        total += slot.sum()
    return [total.item()]


def double_buffering_one_event_fixed() -> Values:
    side = torch.cuda.Stream()
    buffers = [torch.empty(4, device="cuda") for _ in range(2)]
    ready = torch.cuda.Event()
    free = [torch.cuda.Event() for _ in buffers]
    for event in free:
        event.record()  # both buffers are free to fill at the start
    total = torch.zeros((), device="cuda")
    for step, batch in enumerate(_batches(4)):
        slot = buffers[step % 2]
        with torch.cuda.stream(side):
            side.wait_event(free[step % 2])  # the default stream is done reading it
            slot.copy_(batch.pin_memory(), non_blocking=True)
            ready.record()
        torch.cuda.current_stream().wait_event(ready)
        total += slot.sum()
        free[step % 2].record()
    return [total.item()]


# --- 13. offloading to the host on a side stream without waiting for the compute ---------------


def offload_without_wait_stream() -> Values:
    side = torch.cuda.Stream()
    activations = torch.arange(4.0, device="cuda").exp()  # computed on the default stream
    host = torch.empty(4, pin_memory=True)
    with torch.cuda.stream(side):  # the copy may start before `exp` has run
        host.copy_(activations, non_blocking=True)
    side.synchronize()
    return [round(v, 4) for v in host.tolist()]


def offload_without_wait_stream_fixed() -> Values:
    side = torch.cuda.Stream()
    activations = torch.arange(4.0, device="cuda").exp()
    host = torch.empty(4, pin_memory=True)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        host.copy_(activations, non_blocking=True)
    side.synchronize()
    return [round(v, 4) for v in host.tolist()]


PATTERNS = [
    Pattern(
        "d2h_read_before_sync",
        "`x.to('cpu', non_blocking=True)` read on the host before a synchronize",
        d2h_read_before_sync,
        d2h_read_before_sync_fixed,
    ),
    Pattern(
        "tolist_of_nonblocking_copy",
        "`.tolist()` of a `non_blocking` copy to the host",
        tolist_of_nonblocking_copy,
        tolist_of_nonblocking_copy_fixed,
    ),
    Pattern(
        "numpy_of_nonblocking_copy",
        "`.numpy()` of a `non_blocking` copy to the host",
        numpy_of_nonblocking_copy,
        numpy_of_nonblocking_copy_fixed,
    ),
    Pattern(
        "pinned_copy_read_early",
        "`pinned.copy_(x, non_blocking=True)` read before its event is waited for",
        pinned_copy_read_early,
        pinned_copy_read_early_fixed,
    ),
    Pattern(
        "mps_nonblocking_host_copy",
        "MPS: `x.to('cpu', non_blocking=True)` read at once (pytorch#139550)",
        mps_nonblocking_host_copy,
        mps_nonblocking_host_copy_fixed,
        device_type="mps",
    ),
    Pattern(
        "prefetcher_without_wait_stream",
        "home-made side-stream prefetcher without `wait_stream`",
        prefetcher_without_wait_stream,
        prefetcher_without_wait_stream_fixed,
    ),
    Pattern(
        "prefetcher_without_record_stream",
        "side-stream prefetcher without `record_stream` (torchrec#4191)",
        prefetcher_without_record_stream,
        prefetcher_without_record_stream_fixed,
    ),
    Pattern(
        "staging_buffer_reused_early",
        "one pinned staging buffer refilled while its copy may still read it",
        staging_buffer_reused_early,
        staging_buffer_reused_early_fixed,
    ),
    Pattern(
        "event_on_wrong_stream",
        "event recorded on the default stream instead of the copying one",
        event_on_wrong_stream,
        event_on_wrong_stream_fixed,
    ),
    Pattern(
        "side_compute_without_wait",
        "side-stream compute used without `current_stream().wait_stream(side)`",
        side_compute_without_wait,
        side_compute_without_wait_fixed,
    ),
    Pattern(
        "side_copy_read_by_default",
        "side-stream `copy_` into a device buffer read by the default stream",
        side_copy_read_by_default,
        side_copy_read_by_default_fixed,
    ),
    Pattern(
        "double_buffering_one_event",
        "double buffering with one event: a buffer refilled while still read",
        double_buffering_one_event,
        double_buffering_one_event_fixed,
    ),
    Pattern(
        "offload_without_wait_stream",
        "side-stream offload to the host without `side.wait_stream(current)`",
        offload_without_wait_stream,
        offload_without_wait_stream_fixed,
    ),
]


@dataclass(frozen=True)
class Outcome:
    """What one run of a pattern's function gave: its values, or the race finder's error."""

    values: Values | None
    error: devicekit.RaceError | None

    def verdict(self, expected: Values) -> str:
        if self.error is not None:
            return "RaceError"
        assert self.values is not None
        if _same(self.values, expected):
            return "none"
        return "wrong values"


def _same(values: Values, expected: Values) -> bool:
    return len(values) == len(expected) and all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip(values, expected, strict=True)
    )


def run(pattern: Pattern, function: Callable[[], Values], *, races: bool) -> Outcome:
    """Run `function` in a fresh simulation of `pattern`'s device type."""
    with devicekit.simulated_devices(pattern.device_type, 1, races=races):
        try:
            return Outcome(function(), None)
        except devicekit.RaceError as error:
            return Outcome(None, error)


def table() -> tuple[list[str], list[list[str]]]:
    """One row per pattern: what the buggy and the fixed version give under the race finder."""
    headers = ["#", "pattern", "buggy version", "fixed version"]
    rows = []
    for number, pattern in enumerate(PATTERNS, 1):
        expected = run(pattern, pattern.fixed, races=False).values
        assert expected is not None
        buggy = run(pattern, pattern.buggy, races=True).verdict(expected)
        fixed = run(pattern, pattern.fixed, races=True).verdict(expected)
        rows.append(
            [
                str(number),
                pattern.what,
                "found (" + buggy + ")" if buggy != "none" else "missed",
                "ok" if fixed == "none" else "false alarm (" + fixed + ")",
            ]
        )
    return headers, rows


def _cases() -> dict[str, Callable[[], object]]:
    """The timed calls: one small op, and a training step of a small MLP (about 30 ops)."""
    a, b = torch.ones(64, device="cuda"), torch.ones(64, device="cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    ).to("cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = torch.randn(16, 32, device="cuda"), torch.randn(16, 1, device="cuda")

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()

    return {"a + b, 64 elements": lambda: a + b, "SGD step, 2-layer MLP": step}


def cost(rounds: int = 5) -> tuple[list[str], list[list[str]]]:
    """CPU time per call of simulated code without the race finder, with it and nothing in
    flight, and with a side-stream copy in flight (every op then checks its operands)."""

    def measure(races: bool, in_flight: bool) -> dict[str, float]:
        with devicekit.simulated_devices("cuda", 1, races=races):
            keep = None
            if in_flight:
                side = torch.cuda.Stream()
                with torch.cuda.stream(side):
                    keep = torch.ones(64).pin_memory().to("cuda", non_blocking=True)
            try:
                return {
                    name: min(median_cpu_us(call) for _ in range(rounds))
                    for name, call in _cases().items()
                }
            finally:
                del keep

    off = measure(False, False)
    idle = measure(True, False)
    busy = measure(True, True)
    headers = [
        "simulated code",
        "races=False (us)",
        "races=True, idle (us)",
        "ratio",
        "races=True, copy in flight (us)",
        "ratio",
    ]
    rows = [
        [
            name,
            f"{off[name]:.1f}",
            f"{idle[name]:.1f}",
            f"{idle[name] / off[name]:.2f}x",
            f"{busy[name]:.1f}",
            f"{busy[name] / off[name]:.2f}x",
        ]
        for name in off
    ]
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per cost figure")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    headers, rows = table()
    print(format_table(headers, rows))
    found = sum(row[2].startswith("found") for row in rows)
    alarms = sum(row[3] != "ok" for row in rows)
    print(f"\nfound {found} of {len(rows)}; false alarms on fixed versions: {alarms}\n")
    print(format_table(*cost(options.rounds)))


if __name__ == "__main__":
    main()
