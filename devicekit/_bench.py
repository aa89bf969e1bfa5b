"""`devicekit bench`: where does an accelerator start paying for itself on this machine?

An accelerator wins only when an operation is parallel enough to cover the fixed cost of
launching it, and moving the data there and back costs time of its own. This module times
element-wise operations and matrix products of growing size on each device, counts transfers
separately, and finds the size from which each accelerator stays faster than the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from devicekit._discovery import accelerator_type, devices

__all__ = [
    "OPS",
    "Crossover",
    "Measurement",
    "crossovers",
    "format_report",
    "measure",
    "overtakes_from",
    "plot",
    "run",
]

Op = Literal["elementwise", "matmul"]

#: The operations timed, with what `size` means for each.
OPS: dict[Op, str] = {
    "elementwise": "element-wise a * b + a, float32, size = number of elements",
    "matmul": "matrix product a @ b, float32, size = n for n x n matrices",
}

#: Default sizes: 1 Ki to 16 Mi elements, and 8 x 8 to 2048 x 2048 matrices.
DEFAULT_SIZES: dict[Op, tuple[int, ...]] = {
    "elementwise": tuple(4**k for k in range(5, 13)),
    "matmul": tuple(2**k for k in range(3, 12)),
}


@dataclass(frozen=True)
class Measurement:
    """One timed point: an operation of one size on one device.

    Attributes:
        device: Where the operation ran.
        op: `"elementwise"` or `"matmul"` (see `OPS`).
        size: Elements for `"elementwise"`, `n` of the `n x n` matrices for `"matmul"`.
        compute_us: Median microseconds per operation, the device synchronised.
        transfer_us: Median microseconds to copy the inputs from the host and the result
            back; `0.0` on the CPU.
    """

    device: torch.device
    op: Op
    size: int
    compute_us: float
    transfer_us: float

    @property
    def total_us(self) -> float:
        """Compute and transfer together: the cost when the data starts and ends on the host."""
        return self.compute_us + self.transfer_us


@dataclass(frozen=True)
class Crossover:
    """Where one device overtakes the CPU for one operation.

    Attributes:
        device: The accelerator compared with the CPU.
        op: The operation.
        compute_from: The smallest measured size from which the device's compute time stays
            below the CPU's at every larger measured size; `None` if it never does.
        total_from: The same, counting the device's transfer time too.
    """

    device: torch.device
    op: Op
    compute_from: int | None
    total_from: int | None


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == accelerator_type():
        return lambda: torch.accelerator.synchronize(device)
    return lambda: None


def _median_seconds(
    function: Callable[[], object], sync: Callable[[], None], *, repeat: int, budget_s: float
) -> float:
    """Median seconds per call over `repeat` synchronised batches that fill about `budget_s`."""
    function()
    sync()  # warm-up: first calls pay for allocation, kernel selection and library loading
    start = time.perf_counter()
    function()
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(budget_s / repeat / once))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            function()
        sync()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def _inputs(op: Op, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (size,) if op == "elementwise" else (size, size)
    return (torch.rand(shape, generator=generator), torch.rand(shape, generator=generator))


def _compute(op: Op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b + a if op == "elementwise" else a @ b


def measure(
    device: torch.device,
    op: Op,
    size: int,
    *,
    repeat: int = 5,
    budget_s: float = 0.05,
) -> Measurement:
    """Time one operation of one size on one device.

    Args:
        device: Where to run it.
        op: `"elementwise"` or `"matmul"`.
        size: Elements, or `n` of `n x n` matrices.
        repeat: Timed batches; the median is kept.
        budget_s: About how long all batches together take, for fast operations.

    Example:
        >>> import torch
        >>> from devicekit._bench import measure
        >>> point = measure(torch.device("cpu"), "matmul", 8, repeat=3, budget_s=0.001)
        >>> point.compute_us > 0, point.transfer_us
        (True, 0.0)
    """
    sync = _synchronizer(device)
    a_host, b_host = _inputs(op, size, torch.Generator().manual_seed(size))
    a, b = a_host.to(device), b_host.to(device)
    compute = _median_seconds(lambda: _compute(op, a, b), sync, repeat=repeat, budget_s=budget_s)
    transfer = 0.0
    if device.type != "cpu":
        result = _compute(op, a, b)

        def round_trip() -> None:
            a_host.to(device)
            b_host.to(device)
            sync()
            if result.device.type != "meta":  # meta tensors hold no data to bring back
                result.to("cpu")

        transfer = _median_seconds(round_trip, sync, repeat=repeat, budget_s=budget_s)
    return Measurement(device, op, size, compute * 1e6, transfer * 1e6)


def run(
    targets: Sequence[torch.device] | None = None,
    *,
    sizes: dict[Op, Sequence[int]] | None = None,
    repeat: int = 5,
    budget_s: float = 0.05,
    progress: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """Measure every operation and size on every device (by default, every device there is)."""
    chosen = [info.device for info in devices()] if targets is None else list(targets)
    plan = DEFAULT_SIZES if sizes is None else sizes
    results = []
    for device in chosen:
        for op, op_sizes in plan.items():
            for size in op_sizes:
                point = measure(device, op, size, repeat=repeat, budget_s=budget_s)
                results.append(point)
                if progress is not None:
                    progress(point)
    return results


def overtakes_from(
    sizes: Sequence[int], baseline: Sequence[float], other: Sequence[float]
) -> int | None:
    """The smallest size from which `other` is below `baseline` at that and every larger size.

    `sizes` is increasing; `None` if `other` is not faster at the largest size.

    Example:
        >>> from devicekit._bench import overtakes_from
        >>> overtakes_from([1, 2, 4, 8], [1.0, 2.0, 4.0, 8.0], [3.0, 1.0, 5.0, 6.0])
        8
    """
    found = None
    for size, base, time_us in reversed(list(zip(sizes, baseline, other, strict=True))):
        if time_us >= base:
            break
        found = size
    return found


def _by_device_and_op(
    results: Iterable[Measurement],
) -> dict[tuple[torch.device, Op], dict[int, Measurement]]:
    grouped: dict[tuple[torch.device, Op], dict[int, Measurement]] = {}
    for point in results:
        grouped.setdefault((point.device, point.op), {})[point.size] = point
    return grouped


def crossovers(results: Sequence[Measurement]) -> list[Crossover]:
    """For each non-CPU device and operation, where it overtakes the CPU (sizes both measured)."""
    grouped = _by_device_and_op(results)
    cpu = torch.device("cpu")
    found = []
    for (device, op), points in grouped.items():
        baseline = grouped.get((cpu, op))
        if device == cpu or baseline is None:
            continue
        sizes = sorted(set(points) & set(baseline))
        cpu_us = [baseline[size].compute_us for size in sizes]
        compute_from = overtakes_from(sizes, cpu_us, [points[s].compute_us for s in sizes])
        total_from = overtakes_from(sizes, cpu_us, [points[s].total_us for s in sizes])
        found.append(Crossover(device, op, compute_from, total_from))
    return sorted(found, key=lambda c: (str(c.device), list(OPS).index(c.op)))


def _us(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.1f} ms"
    return f"{value:,.1f} us"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  " + "  ".join(cells))
    return lines


def _sentence(crossover: Crossover) -> str:
    def size(value: int | None) -> str:
        if value is None:
            return "never, at the sizes measured"
        return f"from size {value:,}"

    return (
        f"{crossover.device} overtakes cpu for {crossover.op}: {size(crossover.compute_from)} "
        f"(compute only), {size(crossover.total_from)} counting transfers."
    )


def format_report(results: Sequence[Measurement], *, repeat: int = 5) -> str:
    """The tables (median per operation per device) and the crossover sentences, as text."""
    grouped = _by_device_and_op(results)
    device_list: list[torch.device] = []
    for point in results:
        if point.device not in device_list:
            device_list.append(point.device)
    lines = [f"devicekit bench: median time per operation over {repeat} timed batches"]
    for op, description in OPS.items():
        sizes = sorted({point.size for point in results if point.op == op})
        if not sizes:
            continue
        header = ["size"]
        for device in device_list:
            header.append(str(device))
            if device.type != "cpu":
                header.append(f"{device} + transfer")
        rows = [header]
        for size in sizes:
            row = [f"{size:,}"]
            for device in device_list:
                cell = grouped.get((device, op), {}).get(size)
                row.append("-" if cell is None else _us(cell.compute_us))
                if device.type != "cpu":
                    row.append("-" if cell is None else _us(cell.total_us))
            rows.append(row)
        lines += ["", f"{op}: {description}", *_table(rows)]
    lines.append("")
    found = crossovers(results)
    if found:
        lines += [_sentence(crossover) for crossover in found]
    else:
        lines.append(
            "No accelerator was measured on this machine, so only the CPU curve is shown. "
            "Run `devicekit bench` where torch sees a GPU to find where it overtakes the CPU."
        )
    return "\n".join(lines)


def plot(results: Sequence[Measurement], path: str) -> None:
    """Draw time against size per device and operation into an image file (needs matplotlib).

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # an optional dependency: the `plot` extra

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes_list: list[Any] = list(figure.subplots(1, len(OPS)))
    grouped = _by_device_and_op(results)
    for axes, (op, description) in zip(axes_list, OPS.items(), strict=True):
        for (device, point_op), points in grouped.items():
            if point_op != op:
                continue
            sizes = sorted(points)
            line = axes.plot(
                sizes, [points[s].compute_us for s in sizes], marker="o", label=f"{device}"
            )[0]
            if device.type != "cpu":
                axes.plot(
                    sizes,
                    [points[s].total_us for s in sizes],
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{device} + transfer",
                )
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_title(description.split(",")[0], fontsize=10)
        axes.set_xlabel("size (" + description.split("size = ")[1] + ")", fontsize=9)
        axes.set_ylabel("median time per operation (us)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"devicekit bench (torch {torch.__version__})")
    figure.savefig(path, dpi=110)
