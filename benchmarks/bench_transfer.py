"""Coalesced transfers: CPU-side packing cost here, and host<->GPU copies where CUDA exists.

    python -m benchmarks.bench_transfer            # both sections, tables on stdout
    python -m benchmarks.bench_transfer --plot transfer.png

CPU section (any machine): microseconds per tensor spent planning (grouping by dtype and shape),
packing (one `torch.stack` per group into the staging buffer) and unpacking (one `unbind` per
group), beside the CPU cost of one per-tensor `.to("meta")` dispatch for scale.

GPU section (only with CUDA; otherwise it prints why it is skipped): host->device and
device->host for the shapes of issue 7, from pinned and pageable memory, devicekit against
per-tensor `.to(non_blocking=True)` plus one synchronisation, accelerate's `send_to_device`, and
one pinned memcpy of the same bytes (the practical limit, measured in the same run).
"""

from __future__ import annotations

import argparse
import datetime
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import devicekit
from benchmarks._timing import format_table, median_us
from devicekit import _nvml, _transfer

CPU = torch.device("cpu")
KIB = 1024
MIB = 1024 * KIB

#: The CPU shapes: name and a factory of the tensor list.
CPU_SHAPES: dict[str, Callable[[], list[torch.Tensor]]] = {
    "(c) 10,000 x 256 B": lambda: [torch.randn(64) for _ in range(10_000)],
    "(b) 256 x 16 KiB": lambda: [torch.randn(4 * KIB) for _ in range(256)],
    "1,000 x 16 KiB": lambda: [torch.randn(4 * KIB) for _ in range(1000)],
    "512 in 8 shapes": lambda: [torch.randn(8, 4 + i % 8) for i in range(512)],
    "200 distinct 1-D shapes": lambda: [torch.randn(i + 1) for i in range(200)],
    "200 distinct 2-D shapes": lambda: [torch.randn(2, i + 1) for i in range(200)],
}


def _per_tensor(function: Callable[[], object], count: int, repeat: int) -> float:
    return median_us(function, repeat=repeat) / count


def _cpu_row(name: str, tensors: list[torch.Tensor], repeat: int) -> list[object]:
    count = len(tensors)
    packing_plan = _transfer._plan_packing(tensors, on_cpu=True, source=None, limit=None)
    buffer = torch.empty(packing_plan.nbytes, dtype=torch.uint8)
    results = list(tensors)
    planning = _per_tensor(
        lambda: _transfer._plan_packing(tensors, on_cpu=True, source=None, limit=None),
        count,
        repeat,
    )
    packing = _per_tensor(lambda: _transfer._pack(packing_plan, tensors, buffer), count, repeat)
    unpacking = _per_tensor(
        lambda: _transfer._unpack(packing_plan, buffer, results, None), count, repeat
    )
    dispatch = _per_tensor(lambda: [t.to("meta") for t in tensors], count, repeat)
    nbytes = sum(t.nbytes for t in tensors) // count
    total = planning + packing + unpacking
    return [name, nbytes, planning, packing, unpacking, packing + unpacking, total, dispatch]


def cpu_section(repeat: int = 15) -> str:
    """The CPU cost of planning, packing and unpacking, in microseconds per tensor."""
    rows = [_cpu_row(name, make(), repeat) for name, make in CPU_SHAPES.items()]
    headers = [
        "tensors",
        "bytes each",
        "plan",
        "pack",
        "unpack",
        "pack + unpack",
        "all three",
        "one .to('meta')",
    ]
    return (
        "CPU cost per tensor in us, medians of one run. `pack` includes the host memcpy of\n"
        "the bytes into the staging buffer, so it grows with the tensor size; the copy to the\n"
        "device is not included. `one .to('meta')` is the CPU cost of one per-tensor dispatch,\n"
        "for scale.\n\n" + format_table(headers, rows)
    )


# --- GPU section ---------------------------------------------------------------------------

#: The GPU shapes of issue 7: name and the size in bytes of each tensor.
GPU_SHAPES: dict[str, list[int]] = {
    "(a) 8 x 256 KiB-8 MiB": [256 * KIB * 2**i for i in (0, 1, 2, 3, 4, 5)] + [MIB, 8 * MIB],
    "(b) 256 x 16 KiB": [16 * KIB] * 256,
    "(c) 10,000 x 256 B": [256] * 10_000,
    "(d) 256 x 1 MiB": [MIB] * 256,
}
#: device->host shapes: the issue's 1,000 x 16 KiB, and (b) and (c).
D2H_SHAPES: dict[str, list[int]] = {
    "1,000 x 16 KiB": [16 * KIB] * 1000,
    "(b) 256 x 16 KiB": [16 * KIB] * 256,
    "(c) 10,000 x 256 B": [256] * 10_000,
}
#: For the plot: 16 MiB split into this many tensors.
PLOT_COUNTS = [1, 4, 16, 64, 256, 1024, 4096, 16384]


def _host_tensors(sizes: Sequence[int], pinned: bool) -> list[torch.Tensor]:
    tensors = [torch.randn(size // 4) for size in sizes]
    return [t.pin_memory() for t in tensors] if pinned else tensors


def _send_to_device() -> Callable[..., object] | None:
    try:
        from accelerate.utils import send_to_device
    except ImportError:  # a benchmark extra
        return None
    return send_to_device  # type: ignore[no-any-return]


def _h2d_times(tensors: list[torch.Tensor], cuda: torch.device, repeat: int) -> dict[str, float]:
    """Microseconds to move `tensors` to `cuda` and synchronise, for each way of doing it."""
    sync = torch.cuda.synchronize
    flat = torch.empty(sum(t.nbytes for t in tensors), dtype=torch.uint8).pin_memory()
    ways: dict[str, Callable[[], object]] = {
        "devicekit": lambda: (devicekit.to_device(tensors, cuda), sync()),
        "devicekit alone": lambda: (devicekit.to_device(tensors, cuda, coalesce=False), sync()),
        "per-tensor": lambda: ([t.to(cuda, non_blocking=True) for t in tensors], sync()),
        "memcpy": lambda: (flat.to(cuda, non_blocking=True), sync()),
    }
    send = _send_to_device()
    if send is not None:
        ways["accelerate"] = lambda: (send(tensors, cuda, non_blocking=True), sync())
    return {name: median_us(way, repeat=repeat) for name, way in ways.items()}


def _d2h_times(sizes: Sequence[int], cuda: torch.device, repeat: int) -> dict[str, float]:
    """Microseconds to bring tensors of `sizes` from `cuda` to the host, for each way."""
    tensors = [torch.randn(size // 4, device=cuda) for size in sizes]
    flat = torch.empty(sum(t.nbytes for t in tensors), dtype=torch.uint8, device=cuda)
    pinned = torch.empty(flat.numel(), dtype=torch.uint8).pin_memory()
    stream = torch.cuda.current_stream(cuda)

    def per_tensor() -> None:  # one synchronisation at the end, as `to_device` does
        [t.to(CPU, non_blocking=True) for t in tensors]
        stream.synchronize()

    def memcpy() -> None:
        pinned.copy_(flat, non_blocking=True)
        stream.synchronize()

    ways: dict[str, Callable[[], object]] = {
        "devicekit": lambda: devicekit.to_device(tensors, CPU),
        "devicekit alone": lambda: devicekit.to_device(tensors, CPU, coalesce=False),
        "per-tensor": per_tensor,
        "memcpy": memcpy,
    }
    send = _send_to_device()
    if send is not None:
        ways["accelerate"] = lambda: send(tensors, CPU)
    return {name: median_us(way, repeat=repeat) for name, way in ways.items()}


_GPU_HEADERS = [
    "shape",
    "devicekit us",
    "devicekit GB/s",
    "alone / devicekit",
    "per-tensor / devicekit",
    "accelerate / devicekit",
    "memcpy / devicekit",
    "memcpy GB/s",
]


def _row(name: str, nbytes: int, times: dict[str, float]) -> list[object]:
    ours = times["devicekit"]
    return [
        name,
        ours,
        nbytes / ours / 1e3,
        times["devicekit alone"] / ours,
        times["per-tensor"] / ours,
        times["accelerate"] / ours if "accelerate" in times else "-",
        times["memcpy"] / ours,
        nbytes / times["memcpy"] / 1e3,
    ]


def _crossover(cuda: torch.device, repeat: int) -> str:
    """256 tensors of each size, coalesced against alone: where packing stops paying."""
    rows = []
    for size in (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB):
        tensors = _host_tensors([size] * 256, pinned=False)
        times = []
        for coalesce in (True, False):

            def move(tensors: list[torch.Tensor] = tensors, coalesce: bool = coalesce) -> None:
                devicekit.to_device(tensors, cuda, coalesce=coalesce)
                torch.cuda.synchronize()

            times.append(median_us(move, repeat=repeat))
        rows.append([f"{size // KIB} KiB", times[0], times[1], times[1] / times[0]])
    headers = ["tensor size", "coalesced us", "alone us", "alone / coalesced"]
    return (
        f"Threshold crossover, 256 pageable tensors host->device (`COALESCE_MAX_BYTES` is "
        f"{_transfer.COALESCE_MAX_BYTES // KIB} KiB):\n\n" + format_table(headers, rows)
    )


def _plot(cuda: torch.device, path: Path, repeat: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = 16 * MIB
    labels = {"devicekit": "devicekit", "per-tensor": "per-tensor .to()", "memcpy": "one memcpy"}
    curves: dict[str, list[float]] = {label: [] for label in labels.values()}
    for count in PLOT_COUNTS:
        tensors = _host_tensors([total // count] * count, pinned=False)
        times = _h2d_times(tensors, cuda, repeat)
        for name, label in labels.items():
            curves[label].append(total / times[name] / 1e3)
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        axes.plot(PLOT_COUNTS, values, marker="o", label=label)
    axes.set_xscale("log")
    axes.set_xlabel("number of tensors (16 MiB in all, pageable)")
    axes.set_ylabel("host -> device GB/s")
    axes.set_title(torch.cuda.get_device_name(cuda))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def gpu_section(repeat: int = 7, plot: Path | None = None) -> str:
    """Host<->GPU tables, or one line saying why they were not measured."""
    if not torch.cuda.is_available():
        return (
            f"GPU section skipped: CUDA is not available here (torch {torch.__version__}). "
            "Run `python -m benchmarks.run_all` on a CUDA machine for the host<->device tables."
        )
    cuda = torch.device("cuda", torch.cuda.current_device())
    header = (
        f"{torch.cuda.get_device_name(cuda)}, torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, driver {_nvml.driver_version()}, "
        f"{datetime.date.today().isoformat()}, {platform.node()}"
    )
    parts = [header]
    for pinned in (True, False):
        rows = [
            _row(name, sum(sizes), _h2d_times(_host_tensors(sizes, pinned), cuda, repeat))
            for name, sizes in GPU_SHAPES.items()
        ]
        kind = "pinned" if pinned else "pageable"
        parts.append(f"host -> device, {kind} sources:\n\n" + format_table(_GPU_HEADERS, rows))
    rows = [
        _row(name, sum(sizes), _d2h_times(sizes, cuda, repeat))
        for name, sizes in D2H_SHAPES.items()
    ]
    parts.append("device -> host:\n\n" + format_table(_GPU_HEADERS, rows))
    parts.append(_crossover(cuda, repeat))
    if plot is not None:
        _plot(cuda, plot, repeat)
        parts.append(f"Plot written to {plot}.")
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--plot", type=Path, help="PNG of GPU throughput against tensor count")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    print(cpu_section(args.repeat))
    print()
    print(gpu_section(max(3, args.repeat // 2), args.plot))


if __name__ == "__main__":
    main()
