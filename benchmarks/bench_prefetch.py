"""`devicekit.prefetch`: its per-batch overhead on the CPU, and copy/compute overlap on a GPU.

    python -m benchmarks.bench_prefetch            # the CPU table (any machine)
    python -m benchmarks.bench_prefetch --gpu      # the GPU tables (needs CUDA)

CPU section: microseconds per batch that a loop over `prefetch(loader, "cpu")` costs beyond the
same loop over the loader itself, for a batch of 64 tensors (issue 17's target: at most 50 us),
as the median of interleaved repeats. (The stream path's cost shows in the GPU section: under
`simulated_devices` it would be dominated by the simulation's own cost per op.)

GPU section: a loop whose batch is 256 MiB in 64 tensors (pinned, as a `DataLoader` with
`pin_memory=True` yields them) and whose step runs about 20 ms of matmuls that read the batch.
For each way of feeding the loop, the step time, and the exposed copy time (step time minus
compute alone) as a share of the serial copy time (the copy alone): a plain `.to()` loop,
accelerate-style `non_blocking=True` placement on the current stream, torchtnt's
`CudaDataPrefetcher` (a row saying why, if torchtnt is not installed), and `prefetch` at depths 1
and 2 (issue 17's target: at most 5% exposed). Then the reserved memory after each of 50 epochs
of `prefetch`, which must stay flat.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

import devicekit
from benchmarks._timing import format_table, interleaved_median_us, median_cpu_us

#: Tensors per batch, as issue 17 sets them.
TENSORS = 64
#: Bytes per GPU batch (256 MiB).
GPU_BATCH_BYTES = 256 * 1024 * 1024
#: Milliseconds of compute per GPU step.
COMPUTE_MS = 20.0
#: Batches per timed GPU pass, and epochs of the memory check.
GPU_STEPS = 24
EPOCHS = 50


# ---------------------------------------------------------------------------------------------
# CPU: the overhead per batch


def cpu_batches(count: int, *, elements: int = 256) -> list[dict[str, torch.Tensor]]:
    """`count` batches of `TENSORS` float32 tensors (`elements` each), in a dict."""
    return [
        {f"t{i}": torch.full((elements,), float(step)) for i in range(TENSORS)}
        for step in range(count)
    ]


def _loop(iterable: Iterable[Any]) -> None:
    for _ in iterable:
        pass


def cpu_section(batches: int = 256, repeat: int = 15) -> str:
    """The table of per-batch overheads on this machine's CPU: wall time (interleaved
    medians) and this process's CPU time (not inflated by busy neighbours; no thread runs on
    the CPU path, so it is the whole cost)."""
    source = cpu_batches(batches)
    loops: dict[str, Callable[[], object]] = {
        "bare": lambda: _loop(source),
        "prefetch": lambda: _loop(devicekit.prefetch(source, "cpu")),
    }
    wall = interleaved_median_us(loops, repeat=repeat)
    cpu = {name: median_cpu_us(loop, repeat=max(repeat // 3, 3)) for name, loop in loops.items()}
    wall_overhead = (wall["prefetch"] - wall["bare"]) / batches
    cpu_overhead = (cpu["prefetch"] - cpu["bare"]) / batches
    rows: list[list[object]] = [
        [
            "prefetch(loader, 'cpu')",
            f"{TENSORS} x {source[0]['t0'].nbytes} B",
            wall["bare"] / batches,
            wall["prefetch"] / batches,
            wall_overhead,
            cpu_overhead,
            "yes" if min(wall_overhead, cpu_overhead) <= 50 else "no",
        ]
    ]
    headers = [
        "loop",
        "batch",
        "bare us/batch",
        "prefetch us/batch",
        "overhead us (wall)",
        "overhead us (CPU time)",
        "<= 50 us",
    ]
    return (
        f"CPU: prefetch's cost per batch beyond a bare loop ({batches} batches a pass, median "
        f"of {repeat} interleaved repeats, torch {torch.__version__})\n\n"
        + format_table(headers, rows)
    )


# ---------------------------------------------------------------------------------------------
# GPU: overlap of copies with compute


def gpu_batches(
    count: int, nbytes: int = GPU_BATCH_BYTES, *, pinned: bool = True
) -> list[dict[str, torch.Tensor]]:
    """`count` host batches of `TENSORS` float32 tensors, `nbytes` in all."""
    elements = nbytes // TENSORS // 4
    return [
        {f"t{i}": torch.full((elements,), float(step), pin_memory=pinned) for i in range(TENSORS)}
        for step in range(count)
    ]


class Compute:
    """About `milliseconds` of matmuls per step on the current stream, reading the batch."""

    def __init__(self, device: torch.device, milliseconds: float, *, side: int = 4096) -> None:
        self.device = device
        self.weight = torch.randn(side, side, device=device)
        self.state = torch.randn(side, side, device=device)
        self.repeats = 1
        one = _timed(device, lambda: self.step(None))
        self.repeats = max(1, round(milliseconds / max(one, 1e-3)))

    def step(self, batch: dict[str, torch.Tensor] | None) -> None:
        state = self.state
        for _ in range(self.repeats):
            state = torch.tanh(state @ self.weight)
        if batch is not None:
            reads = torch.stack([t[:1] for t in batch.values()]).sum()
            state = state + reads
        self.state = state


def _timed(device: torch.device, function: Callable[[], object], repeat: int = 5) -> float:
    """Median milliseconds of `function`, device work included."""
    samples = []
    for _ in range(repeat):
        torch.accelerator.synchronize(device)
        start = time.perf_counter()
        function()
        torch.accelerator.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _run(feed: Callable[[], Iterable[Any]], compute: Compute) -> None:
    for batch in feed():
        compute.step(batch)


def _plain(batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> Iterator[Any]:
    for batch in batches:
        yield {name: t.to(device) for name, t in batch.items()}


def _non_blocking(
    batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> Iterator[Any]:
    # What accelerate's `send_to_device(batch, device, non_blocking=True)` does: the copies are
    # issued on the current stream, so the step's compute waits for them.
    for batch in batches:
        yield {name: t.to(device, non_blocking=True) for name, t in batch.items()}


def _torchtnt() -> Callable[[Iterable[Any], torch.device], Iterable[Any]] | str:
    try:
        from torchtnt.utils.data import CudaDataPrefetcher  # type: ignore[import-not-found]
    except ImportError as error:
        return f"not installed ({error})"

    def feed(batches: Iterable[Any], device: torch.device) -> Iterable[Any]:
        return CudaDataPrefetcher(batches, device=device, num_prefetch_batches=2)  # type: ignore[no-any-return]

    return feed


def gpu_section(
    device: torch.device | None = None,
    *,
    nbytes: int = GPU_BATCH_BYTES,
    compute_ms: float = COMPUTE_MS,
    steps: int = GPU_STEPS,
    epochs: int = EPOCHS,
    side: int = 4096,
) -> str:
    """The GPU tables; `device` defaults to the current CUDA device; `side`: the matmuls'."""
    if device is None:
        if not torch.cuda.is_available():
            return "GPU section skipped: CUDA is not available on this machine."
        device = torch.device("cuda", torch.cuda.current_device())
    batches = gpu_batches(4, nbytes)
    loader = [batches[i % len(batches)] for i in range(steps)]
    compute = Compute(device, compute_ms, side=side)

    def copy_only() -> None:
        for batch in loader:
            devicekit.to_device(batch, device)

    def compute_only() -> None:
        for _ in loader:
            compute.step(None)

    copy_ms = _timed(device, copy_only) / steps
    alone_ms = _timed(device, compute_only) / steps
    feeds: dict[str, Callable[[], Iterable[Any]] | str] = {
        "plain .to() loop": lambda: _plain(loader, device),
        "non_blocking=True on the current stream (accelerate)": lambda: _non_blocking(
            loader, device
        ),
        "devicekit.prefetch, depth=1": lambda: devicekit.prefetch(loader, device, depth=1),
        "devicekit.prefetch, depth=2": lambda: devicekit.prefetch(loader, device, depth=2),
    }
    tnt = _torchtnt()
    feeds["torchtnt CudaDataPrefetcher (2 ahead)"] = (
        tnt if isinstance(tnt, str) else (lambda: tnt(loader, device))
    )
    rows: list[list[object]] = []
    for name, feed in feeds.items():
        if isinstance(feed, str):
            rows.append([name, "-", "-", f"skipped: {feed}"])
            continue
        step_ms = _timed(device, functools.partial(_run, feed, compute), repeat=3) / steps
        exposed = max(step_ms - alone_ms, 0.0)
        rows.append([name, step_ms, exposed, f"{100 * exposed / copy_ms:.1f}%"])
    overlap = format_table(["feed", "ms/step", "exposed copy ms", "exposed / serial copy"], rows)

    prefetched = devicekit.prefetch(loader[: len(batches)], device, depth=2)
    reserved = []
    for _ in range(epochs):
        _run(lambda: prefetched, compute)
        torch.accelerator.synchronize(device)
        reserved.append(torch.accelerator.memory_reserved(device))
    mib = 1024 * 1024
    memory = format_table(
        ["epochs", "reserved after epoch 1 (MiB)", "max (MiB)", f"after epoch {epochs} (MiB)"],
        [[epochs, reserved[0] / mib, max(reserved) / mib, reserved[-1] / mib]],
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return (
        f"GPU ({name}, torch {torch.__version__}): {TENSORS} pinned tensors of "
        f"{nbytes / TENSORS / mib:.1f} MiB a batch, {steps} steps of {alone_ms:.1f} ms of "
        f"compute; the copy alone takes {copy_ms:.2f} ms a batch.\n\n"
        f"{overlap}\n\nReserved memory over {epochs} epochs of prefetch:\n\n{memory}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gpu", action="store_true", help="run the GPU tables (needs CUDA)")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--batches", type=int, default=256, help="batches per CPU pass")
    args = parser.parse_args(argv)
    if args.gpu:
        print(gpu_section())
        return
    print(cpu_section(args.batches, args.repeat))


if __name__ == "__main__":
    main()
