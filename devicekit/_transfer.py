"""Coalesced copies: many small tensors cross between host and accelerator in one transfer.

Every `.to()` between host and accelerator pays a fixed cost of several microseconds, so a batch
of hundreds of small tensors spends its time on overheads rather than on the bus. Here the small
tensors are grouped by dtype and shape, packed with one fused `torch.stack` per group into one
byte buffer (a pinned staging buffer when going to the accelerator), moved with one copy, and
handed back as views of the moved buffer, one per tensor. Tensors that do not fit the fast path
(large, non-contiguous, requiring grad, subclasses, other layouts) go alone, with `.to()`.

Results are what `[t.to(device) for t in tensors]` gives: same values bit for bit, shapes,
strides, dtypes. They are views of one buffer that do not overlap, so writing into one never
changes another; the buffer lives as long as any of them does.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import torch

__all__ = ["COALESCE_MAX_BYTES", "Coalesce", "transfer_tensors"]

#: How `to_device` groups small tensors: `"auto"` between host and accelerator, `True` for every
#: packable tensor whatever its size (also to `meta`), `False` never.
Coalesce: TypeAlias = bool | Literal["auto"]

#: Tensors up to this many bytes are coalesced under `coalesce="auto"`. Packing costs one host
#: memcpy per byte; going alone costs a fixed launch of a few microseconds. With a host memcpy of
#: about 15 GB/s, 64 KiB take about 4 us, the cost of one launch: beyond that, packing stops
#: paying. This is an estimate from published figures, not a measurement on a GPU; the crossover
#: table of `benchmarks/bench_transfer.py` measures it on a CUDA machine.
COALESCE_MAX_BYTES = 64 * 1024

#: Groups start at multiples of this many bytes inside the packed buffer, so that every dtype
#: view of a slice is aligned (16 bytes is the largest element, `complex128`).
_ALIGN = 64
#: Shapes that occur at least this often are stacked as one group; rarer ones are flattened and
#: concatenated per dtype (a stacked group costs about four tensor operations of its own).
_MIN_STACK = 3
#: Dtypes `torch.stack`/`torch.cat` support on every backend; other dtypes of the same element
#: size travel reinterpreted as an integer dtype (`float8`, `uint16`, `complex32`, ...).
_NATIVE = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
#: The smallest staging buffer, in bytes.
_MIN_STAGING = 64 * 1024
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HOST = torch.device("cpu")


@dataclass(slots=True)
class _Group:
    """Tensors packed together: one shape (stacked), or mixed shapes (`shape is None`, flat)."""

    dtype: torch.dtype
    carrier: torch.dtype  # the dtype `stack`/`cat` packs with: `dtype` or a same-size int
    shape: torch.Size | None
    indices: list[int] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)  # per tensor, flat groups only
    numels: list[int] = field(default_factory=list)  # per tensor, flat groups only
    offset: int = 0
    nbytes: int = 0


# (type, layout, dtype, shape, strides, requires_grad, is_cpu): tensors packable alike
_Key: TypeAlias = tuple[type, torch.layout, torch.dtype, torch.Size, tuple[int, ...], bool, bool]


@dataclass(slots=True)
class _Plan:
    groups: list[_Group]
    alone: list[int]
    nbytes: int


@functools.lru_cache(maxsize=4096)  # batches repeat their shapes from step to step
def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _carrier(dtype: torch.dtype) -> torch.dtype | None:
    if dtype in _NATIVE:
        return dtype
    if dtype.is_complex or dtype.is_floating_point or not dtype.is_signed:
        return _SAME_SIZE_INT.get(dtype.itemsize)
    return None  # quantized and other special dtypes go alone


def _plan(
    tensors: Sequence[torch.Tensor],
    *,
    on_cpu: bool,
    source: torch.device | None,
    limit: int | None,
) -> _Plan:
    """Group the tensors that can be packed; `limit` is the largest tensor in bytes (or none).

    Only tensors whose `is_cpu` is `on_cpu` are packed, and only those on `source` if given.
    """
    by_key: dict[_Key, list[int]] = {}
    alone: list[int] = []
    for i, tensor in enumerate(tensors):
        try:
            key = (
                type(tensor),
                tensor.layout,
                tensor.dtype,
                tensor.shape,
                tensor.stride(),
                tensor.requires_grad,
                tensor.is_cpu,
            )
        except RuntimeError:  # nested and other layouts without strides
            alone.append(i)
            continue
        members = by_key.get(key)
        if members is None:
            by_key[key] = [i]
        else:
            members.append(i)

    stacked: list[_Group] = []
    flat: dict[torch.dtype, _Group] = {}
    for (kind, layout, dtype, shape, strides, requires_grad, is_cpu), indices in by_key.items():
        carrier = _carrier(dtype)
        if (
            kind is not torch.Tensor
            or layout is not torch.strided
            or requires_grad
            or carrier is None
            or is_cpu is not on_cpu
            or strides != _contiguous_strides(shape)
            or (limit is not None and shape.numel() * dtype.itemsize > limit)
            or (source is not None and any(tensors[i].device != source for i in indices))
        ):
            alone.extend(indices)
        elif len(indices) >= _MIN_STACK:
            stacked.append(_Group(dtype, carrier, shape, indices))
        else:
            group = flat.get(dtype)
            if group is None:
                group = flat[dtype] = _Group(dtype, carrier, None)
            numel = shape.numel()
            group.indices.extend(indices)
            group.shapes.extend([shape] * len(indices))
            group.numels.extend([numel] * len(indices))

    groups = stacked + list(flat.values())
    offset = 0
    for group in groups:
        group.offset = offset
        count = len(group.indices) if group.shape is not None else 1
        numel = group.shape.numel() if group.shape is not None else sum(group.numels)
        group.nbytes = count * numel * group.dtype.itemsize
        offset += -(-group.nbytes // _ALIGN) * _ALIGN
    return _Plan(groups, alone, offset)


def _pack(plan: _Plan, tensors: Sequence[torch.Tensor], buffer: torch.Tensor) -> None:
    """Write every group's tensors into its slice of the byte `buffer` (one fused op per group)."""
    for group in plan.groups:
        members = [tensors[i] for i in group.indices]
        if group.carrier is not group.dtype:
            members = [tensor.view(group.carrier) for tensor in members]
        out = buffer[group.offset : group.offset + group.nbytes].view(group.carrier)
        if group.shape is not None:
            torch.stack(members, out=out.view(len(members), *group.shape))
        else:
            flat = [
                tensor if len(shape) == 1 else tensor.reshape(-1)
                for tensor, shape in zip(members, group.shapes, strict=True)
            ]
            torch.cat(flat, out=out)


def _unpack(
    plan: _Plan, buffer: torch.Tensor, results: list[torch.Tensor], dtype: torch.dtype | None
) -> None:
    """Split the moved byte `buffer` into one view per packed tensor, cast to `dtype` if given."""
    for group in plan.groups:
        data = buffer[group.offset : group.offset + group.nbytes].view(group.carrier)
        if group.carrier is not group.dtype:
            data = data.view(group.dtype)
        if dtype is not None and (group.dtype.is_floating_point or group.dtype.is_complex):
            data = data.to(dtype)
        if group.shape is not None:
            parts = data.view(len(group.indices), *group.shape).unbind(0)
            for i, part in zip(group.indices, parts, strict=True):
                results[i] = part
        else:
            parts = torch.split(data, group.numels)
            for i, part, shape in zip(group.indices, parts, group.shapes, strict=True):
                results[i] = part if len(shape) == 1 else part.view(shape)


def _pinnable(device: torch.device) -> bool:
    """Whether host memory can be pinned for copies with `device` (CUDA and XPU, not MPS)."""
    if device.type not in ("cuda", "xpu"):
        return False
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator is not None and accelerator.type == device.type


def _record_event(device: torch.device) -> torch.Event | None:
    """An event marking the end of the work queued so far on `device`'s current stream."""
    if device.type in ("cpu", "meta"):
        return None  # copies with these devices are finished when they return
    event = torch.Event(device=device)
    event.record(torch.accelerator.current_stream(device))
    return event


class _Staging:
    """The one host buffer that small tensors are packed into on their way to an accelerator.

    It grows (in powers of two) to the largest batch coalesced so far and is reused, but only
    once the copy out of it has finished: each copy records an event, and the next user waits
    for it. The lock makes concurrent callers take turns.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._buffer: torch.Tensor | None = None
        self._pinned = False
        self._event: torch.Event | None = None

    def take(self, nbytes: int, *, pin: bool) -> torch.Tensor:
        """The buffer, at least `nbytes` long, once no copy from it is in flight (hold `lock`)."""
        self.wait()
        buffer = self._buffer
        if buffer is None or buffer.numel() < nbytes or self._pinned is not pin:
            self._buffer = None  # free the old buffer before allocating its successor
            # Powers of two, as torch's pinned-memory cache rounds them: growing takes few steps.
            size = 1 << max(nbytes - 1, _MIN_STAGING - 1).bit_length()
            buffer = self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            self._pinned = pin
        return buffer

    def in_flight(self, event: torch.Event | None) -> None:
        """Record that a copy from the buffer runs until `event` (hold `lock`)."""
        self._event = event

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def clear(self) -> None:
        """Free the buffer (after its last copy)."""
        with self.lock:
            self.wait()
            self._buffer = None


_STAGING = _Staging()


def _to_accelerator(
    plan: _Plan, tensors: Sequence[torch.Tensor], device: torch.device, *, non_blocking: bool
) -> torch.Tensor:
    """Pack into the staging buffer and copy it to `device`: one transfer."""
    emulate = _EMULATE is not None
    pin = not emulate and _pinnable(device)
    asynchronous = non_blocking and pin
    with _STAGING.lock:
        buffer = _STAGING.take(plan.nbytes, pin=pin)[: plan.nbytes]
        _pack(plan, tensors, buffer)
        moved = buffer.clone() if emulate else buffer.to(device, non_blocking=asynchronous)
        _STAGING.in_flight(_record_event(device) if asynchronous else None)
    return moved


def _to_host(plan: _Plan, tensors: Sequence[torch.Tensor], source: torch.device) -> torch.Tensor:
    """Gather on `source`, copy into fresh (pinned) host memory once, wait for that copy."""
    gathered = torch.empty(plan.nbytes, dtype=torch.uint8, device=source)
    _pack(plan, tensors, gathered)
    pin = _EMULATE is None and _pinnable(source)
    host = torch.empty(plan.nbytes, dtype=torch.uint8, pin_memory=pin)
    host.copy_(gathered, non_blocking=pin)
    if pin:
        event = _record_event(source)
        if event is not None:
            event.synchronize()
    return host


#: Tests and benchmarks only: run the coalesced path from `cpu` to `cpu` as if one side were an
#: accelerator. `"to_accelerator"` packs into the staging buffer and "copies" it with `clone()`;
#: `"to_host"` gathers on the source and copies into fresh host memory.
Emulation: TypeAlias = Literal["to_accelerator", "to_host"]
_EMULATE: Emulation | None = None


@contextlib.contextmanager
def _emulating(mode: Emulation) -> Iterator[None]:
    """Within the block, `cpu -> cpu` transfers take the coalesced path as described by `mode`."""
    global _EMULATE
    saved, _EMULATE = _EMULATE, mode
    try:
        yield
    finally:
        _EMULATE = saved


def _crossing(
    tensors: Sequence[torch.Tensor], device: torch.device, coalesce: Coalesce
) -> tuple[bool, torch.device | None] | None:
    """How packed tensors cross, or `None`: whether they are on `cpu`, and the accelerator they
    come from (`None` when going from the host to `device`)."""
    if _EMULATE is not None and device.type == "cpu":
        return (True, None) if _EMULATE == "to_accelerator" else (True, _HOST)
    if device.type == "cpu":
        for tensor in tensors:
            if not tensor.is_cpu and not tensor.is_meta:
                return False, tensor.device
        return None
    if device.type == "meta" and coalesce is not True:
        return None
    return True, None


def _coalesced(
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    results: list[torch.Tensor],
    *,
    dtype: torch.dtype | None,
    non_blocking: bool,
    coalesce: Coalesce,
) -> list[int]:
    """Move what can be packed into `results`; the indices of the tensors left to go alone."""
    everything = list(range(len(tensors)))
    crossing = _crossing(tensors, device, coalesce)
    if crossing is None:
        return everything
    on_cpu, source = crossing
    limit = None if coalesce is True else COALESCE_MAX_BYTES
    plan = _plan(tensors, on_cpu=on_cpu, source=source, limit=limit)
    if not plan.groups or (len(tensors) - len(plan.alone) < 2 and coalesce is not True):
        return everything
    try:
        if source is None:
            moved = _to_accelerator(plan, tensors, device, non_blocking=non_blocking)
        else:
            moved = _to_host(plan, tensors, source)
        _unpack(plan, moved, results, dtype)
    except RuntimeError:  # out of memory and the like: go per tensor, which names the culprit
        return everything
    return plan.alone


def _each(
    tensors: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
    non_blocking: bool,
) -> list[torch.Tensor]:
    """Per-tensor `.to()`, casting floating-point and complex tensors only."""
    moved = []
    for tensor in tensors:
        cast = dtype if tensor.is_floating_point() or tensor.is_complex() else None
        moved.append(tensor.to(device, dtype=cast, non_blocking=non_blocking))
    return moved


def transfer_tensors(
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    non_blocking: bool | Literal["auto"] = False,
    coalesce: Coalesce = "auto",
    alone: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Move `tensors` to `device`, coalescing the small ones; the results in the same order.

    Each result is what `t.to(device, dtype=..., non_blocking=...)` gives, with `dtype` applied
    to floating-point and complex tensors only (like `Module.to`). Coalesced copies to the host
    are finished when this returns; coalesced copies to an accelerator come from pinned staging
    and are ordered on the accelerator's current stream, asynchronous unless `non_blocking` is
    `False`. `alone` moves the tensors that are not coalesced (default: `.to()` each, with
    `non_blocking=True` only if `non_blocking is True`), and returns them in order.

    Example:
        >>> import torch
        >>> from devicekit._transfer import transfer_tensors
        >>> moved = transfer_tensors(
        ...     [torch.ones(2), torch.zeros(3, 1)], torch.device("meta"), coalesce=True
        ... )
        >>> [(t.device.type, tuple(t.shape)) for t in moved]
        [('meta', (2,)), ('meta', (3, 1))]
    """
    everything = tensors if isinstance(tensors, list) else list(tensors)
    if alone is None:
        alone = functools.partial(
            _each, device=device, dtype=dtype, non_blocking=non_blocking is True
        )
    if coalesce is False or len(tensors) < (1 if coalesce is True else 2):
        return alone(everything)
    results = list(tensors)
    rest = _coalesced(
        tensors,
        device,
        results,
        dtype=dtype,
        non_blocking=non_blocking is not False,
        coalesce=coalesce,
    )
    if len(rest) == len(tensors):
        return alone(everything)
    if rest:
        for i, tensor in zip(rest, alone([tensors[i] for i in rest]), strict=True):
            results[i] = tensor
    return results
