"""The transfer pipeline: the tensors of one `to_device` call in, the moved tensors out.

`devicekit._move` walks a batch and hands its tensors here with one `TransferRequest` (target,
`non_blocking`, `dtype`, `coalesce`); nothing here calls back into `_move`. `move_leaves` is the
entry point, and every copy of tensor data that `to_device` makes happens below it:

1. Tensors already in place (device and dtype) are left as they are (`_pending`).
2. Tensors sharing a storage (views, tied or loaded weights) move as one copy of the span of
   the storage they use and come back as views of one moved storage (`_copy_views`).
3. The other tensors go through `transfer_tensors`: small ones crossing between host and
   accelerator are coalesced (below), the rest are copied one by one (`_copy_each`).
4. Copies to the host, and to or from MPS, are waited for before returning, one event per
   device (`_synchronize`), so a returned tensor never changes under the caller.

`copy_mode` is the one place where `non_blocking` is decided: every copy (per tensor,
coalesced, or a module's `Module.to`) asks it for its own `non_blocking` and what to wait for.

Coalescing: every `.to()` between host and accelerator pays a fixed cost of several
microseconds, so a batch of hundreds of small tensors spends its time on overheads rather than
on the bus. The small tensors are grouped by dtype and shape, packed with one fused
`torch.stack` per group into one byte buffer (a pinned staging buffer when going to the
accelerator), moved with one copy, and handed back as views of the moved buffer, one per
tensor. Tensors that do not fit (large, non-contiguous, requiring grad, subclasses, other
layouts, quantized and other special dtypes) go alone, with `.to()`. Results are what
`[t.to(device) for t in tensors]` gives: same values bit for bit, shapes, strides, dtypes. They
are views of one buffer that do not overlap, so writing into one never changes another; the
buffer lives as long as any of them does.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Literal, TypeAlias

import torch

__all__ = [
    "COALESCE_MAX_BYTES",
    "Coalesce",
    "NonBlocking",
    "TransferFailed",
    "TransferRequest",
    "cast_dtype",
    "copy_mode",
    "move_leaves",
    "transfer_tensors",
]

#: How copies may overlap: `"auto"` where that is safe, `True` always, `False` never.
NonBlocking: TypeAlias = bool | Literal["auto"]

#: How `to_device` groups small tensors: `"auto"` between host and accelerator, `True` for every
#: packable tensor whatever its size (also to `meta`), `False` never.
Coalesce: TypeAlias = bool | Literal["auto"]

#: Tensors up to this many bytes are coalesced under `coalesce="auto"`. Packing costs one host
#: memcpy per byte; going alone costs a fixed launch of a few microseconds. With a host memcpy of
#: about 15 GB/s, 64 KiB take about 4 us, the cost of one launch: beyond that, packing stops
#: paying. This is an estimate from published figures, not a measurement on a GPU; the crossover
#: table of `benchmarks/bench_transfer.py` measures it on a CUDA machine.
COALESCE_MAX_BYTES = 64 * 1024

_HOST = torch.device("cpu")
_STORAGE = torch.Tensor.untyped_storage
_TO = torch.Tensor.to


@dataclass(frozen=True, slots=True)
class TransferRequest:
    """What one `to_device` call asks of the transfer; built once per distinct set of arguments.

    Attributes:
        target: The device the tensors go to.
        non_blocking: `"auto"`, `True` or `False`, as `to_device` takes it; `copy_mode` turns it
            into the `non_blocking` of each copy.
        dtype: The dtype floating-point and complex tensors are cast to, or `None`.
        coalesce: `"auto"`, `True` or `False`, as `to_device` takes it.
        target_type: `target.type`, read once (reading it costs about a microsecond).
    """

    target: torch.device
    non_blocking: NonBlocking = "auto"
    dtype: torch.dtype | None = None
    coalesce: Coalesce = "auto"
    target_type: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_type", self.target.type)


class TransferFailed(Exception):
    """One tensor failed to move; `to_device` turns this into a `MoveError` with its path."""

    def __init__(self, tensor: torch.Tensor, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.tensor = tensor
        self.cause = cause
        try:
            self.nbytes: int | None = tensor.nbytes
        except Exception:  # nested and other tensors without a plain size
            self.nbytes = None


#: `device.type` by device: reading `torch.device.type` costs about a microsecond each time.
_TYPES: dict[torch.device, str] = {}


def _type(device: torch.device) -> str:
    try:
        return _TYPES[device]
    except KeyError:
        kind = _TYPES[device] = device.type
        return kind


# ---------------------------------------------------------------------------------------------
# The asynchrony policy


def copy_mode(
    source: torch.device | None, request: TransferRequest, *, pinned: bool = False
) -> tuple[bool, torch.device | None]:
    """The `non_blocking` of one copy from `source`, and the device to wait for after it.

    The one place where `non_blocking` is decided. Copies to the host, and to or from MPS, may
    be issued asynchronously but are then waited for (one event per accelerator) before the
    transfer returns, so a returned tensor never changes under the caller. Host-to-accelerator
    copies are asynchronous from `pinned` memory only under `"auto"`, and
    accelerator-to-accelerator copies are asynchronous (stream-ordered). A `source` of `None`
    stands for a module's tensors (`Module.to`), which cannot be waited for one by one: they
    are asynchronous only with `non_blocking=True`, and never when they would need a wait.

    Example:
        >>> import torch
        >>> from devicekit._transfer import TransferRequest, copy_mode
        >>> to_host = TransferRequest(torch.device("cpu"))
        >>> copy_mode(torch.device("cuda", 0), to_host)
        (True, device(type='cuda', index=0))
        >>> copy_mode(torch.device("cpu"), TransferRequest(torch.device("cuda", 0)))
        (False, None)
    """
    to, non_blocking = request.target_type, request.non_blocking
    if source is None:
        return non_blocking is True and to not in ("cpu", "mps", "meta"), None
    source_type = _type(source)
    if to == "meta" or source_type == "meta" or source == request.target:
        return False, None
    asynchronous = non_blocking is not False
    if to == "cpu" or to == "mps" or source_type == "mps":
        if not asynchronous:
            return False, None
        return True, request.target if source_type == "cpu" else source
    if source_type == "cpu":
        return (pinned if non_blocking == "auto" else asynchronous), None
    return asynchronous, None


def _synchronize(devices: Collection[torch.device]) -> None:
    """Wait for the copies queued so far on each device's current stream: one event each."""
    for device in devices:
        event = torch.Event(device=device)
        event.record(torch.accelerator.current_stream(device))
        event.synchronize()


# ---------------------------------------------------------------------------------------------
# The entry point


def move_leaves(
    leaves: list[torch.Tensor], request: TransferRequest, *, plain: bool
) -> list[torch.Tensor]:
    """Every leaf moved, in order; a leaf already in place is itself, and `leaves` itself comes
    back when none moved. `plain`: all leaves are exactly `torch.Tensor`.

    The same tensor may appear more than once and then comes back as one moved tensor.

    Raises:
        TransferFailed: A copy failed; `to_device` re-raises it as `MoveError` with a path.

    Example:
        >>> import torch
        >>> from devicekit._transfer import TransferRequest, move_leaves
        >>> base = torch.arange(4.0)
        >>> request = TransferRequest(torch.device("meta"))
        >>> moved = move_leaves([base[:2], base[2:]], request, plain=True)
        >>> moved[0].untyped_storage() is moved[1].untyped_storage()
        True
    """
    meta = request.target_type == "meta"
    if plain and meta and request.dtype is None and request.coalesce is not True:
        moved = _dispatch_at_once(leaves, request.target)
        if moved is not None:
            return moved
    pending = _pending(leaves, request)
    if not pending:
        return leaves
    moved = move_tensors(pending, request)
    if len(pending) == len(leaves):
        return moved
    by_id = dict(zip(map(id, pending), moved, strict=True))
    return [by_id.get(id(t), t) for t in leaves]


def _dispatch_at_once(
    leaves: list[torch.Tensor], target: torch.device
) -> list[torch.Tensor] | None:
    """The common dispatch-only case, in C loops: every tensor alone on its storage (storages
    hash by identity), and `.to()` returns a tensor already on `meta` as itself, so none needs
    checking first. `None` when the general path must run (shared storages, or a failure that
    it then names)."""
    try:
        alone_on_storage = len(set(map(_STORAGE, leaves))) == len(leaves)
    except Exception:  # sparse, nested or wrapper-subclass tensors have no storage
        return None
    if not alone_on_storage:
        return None
    try:
        return list(map(_TO, leaves, repeat(target)))
    except Exception:  # the general path names the failing tensor
        return None


def cast_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype` for floating-point and complex tensors, like `Module.to(dtype)`; else `None`."""
    if dtype is None or not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    return dtype


def _pending(leaves: list[torch.Tensor], request: TransferRequest) -> list[torch.Tensor]:
    """The leaves that need a copy or a cast."""
    target, dtype = request.target, request.dtype
    if dtype is None:
        if request.target_type == "cpu":
            return [t for t in leaves if not t.is_cpu]
        if request.target_type == "meta":
            return [t for t in leaves if not t.is_meta]
        return [t for t in leaves if t.device != target]
    return [t for t in leaves if t.device != target or cast_dtype(t, dtype) not in (None, t.dtype)]


def move_tensors(tensors: list[torch.Tensor], request: TransferRequest) -> list[torch.Tensor]:
    """Move tensors that all need a copy or a cast, keeping their aliasing.

    Tensors sharing a storage are moved as one copy of the part of the storage they use and
    come back as views of one moved storage, with the same strides and relative offsets. Views
    that cannot be re-viewed safely (different dtypes over one storage, autograd history,
    conjugate or quantized views) are moved one by one. The other tensors go through
    `transfer_tensors`' steps. Host-bound copies are waited for before returning.

    Raises:
        TransferFailed: A copy failed.
    """
    try:
        storages: list[object] = list(map(_STORAGE, tensors))
    except Exception:  # sparse, nested or wrapper-subclass tensors have no storage to share
        storages = [_storage_or_self(t) for t in tensors]
    keys = list(map(id, storages))  # `storages` keeps every storage alive: ids stay unique
    waits: set[torch.device] = set()
    try:
        if len(set(keys)) == len(keys):
            return _transfer_distinct(tensors, request, waits)
        groups: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            groups.setdefault(key, []).append(position)
        result: list[torch.Tensor | None] = [None] * len(tensors)
        singles: list[torch.Tensor] = []  # one distinct tensor per storage: moved together
        for positions in groups.values():
            distinct = list({id(tensors[p]): tensors[p] for p in positions}.values())
            if len(distinct) == 1:
                singles.append(distinct[0])
                continue
            if _shares_cleanly(distinct):
                moved = _copy_views(distinct, request, waits)
            else:
                moved = _copy_each(distinct, request, waits)
            by_id = {id(t): m for t, m in zip(distinct, moved, strict=True)}
            for position in positions:
                result[position] = by_id[id(tensors[position])]
        moved_singles = _transfer_distinct(singles, request, waits)
        by_id = {id(t): m for t, m in zip(singles, moved_singles, strict=True)}
        return [by_id[id(t)] if r is None else r for t, r in zip(tensors, result, strict=True)]
    finally:
        if waits:
            _synchronize(waits)


def transfer_tensors(
    tensors: Sequence[torch.Tensor], request: TransferRequest
) -> list[torch.Tensor]:
    """Move `tensors` as `[t.to(...) for t in tensors]` would, coalescing the small ones.

    Each result is what `t.to(request.target)` gives, with `request.dtype` applied to
    floating-point and complex tensors only (like `Module.to`); no aliasing between the inputs
    is kept (see `move_tensors` for that). Coalesced copies to an accelerator come from pinned
    staging and are ordered on the accelerator's current stream; copies to the host are
    finished when this returns.

    Raises:
        TransferFailed: A copy failed.

    Example:
        >>> import torch
        >>> from devicekit._transfer import TransferRequest, transfer_tensors
        >>> request = TransferRequest(torch.device("meta"), coalesce=True)
        >>> moved = transfer_tensors([torch.ones(2), torch.zeros(3, 1)], request)
        >>> [(t.device.type, tuple(t.shape)) for t in moved]
        [('meta', (2,)), ('meta', (3, 1))]
    """
    waits: set[torch.device] = set()
    try:
        return _transfer_distinct(list(tensors), request, waits)
    finally:
        if waits:
            _synchronize(waits)


def _transfer_distinct(
    tensors: list[torch.Tensor], request: TransferRequest, waits: set[torch.device]
) -> list[torch.Tensor]:
    """`transfer_tensors` without the wait: the devices to wait for are added to `waits`."""
    coalesce = request.coalesce
    if (
        coalesce is False
        or len(tensors) < (1 if coalesce is True else 2)
        or (coalesce is not True and request.target_type == "meta")  # meta is no accelerator
    ):
        return _copy_each(tensors, request, waits)
    results = list(tensors)
    rest = _coalesced(tensors, request, results, waits)
    if len(rest) == len(tensors):
        return _copy_each(tensors, request, waits)
    if rest:
        moved = _copy_each([tensors[i] for i in rest], request, waits)
        for i, tensor in zip(rest, moved, strict=True):
            results[i] = tensor
    return results


def _storage_or_self(tensor: torch.Tensor) -> object:
    try:
        return tensor.untyped_storage()
    except Exception:
        return tensor


# ---------------------------------------------------------------------------------------------
# Per-tensor copies and views of one storage


def _rewrap(original: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Keep an `nn.Parameter` one (its `.to()` returns a plain tensor, as a leaf)."""
    if type(original) is torch.nn.Parameter and type(moved) is not torch.nn.Parameter:
        return torch.nn.Parameter(moved, requires_grad=original.requires_grad)
    return moved


def _copy_each(
    tensors: list[torch.Tensor], request: TransferRequest, waits: set[torch.device]
) -> list[torch.Tensor]:
    """`.to()` each tensor, with the `non_blocking` that `copy_mode` gives it."""
    target, dtype = request.target, request.dtype
    out: list[torch.Tensor] = []
    append = out.append
    try:
        if request.target_type == "meta" and dtype is None:
            try:
                out = [tensor.to(target) for tensor in tensors]
            except Exception:  # find which one failed
                out = []
                append = out.append
                for tensor in tensors:
                    append(tensor.to(target))
        else:
            pins = request.non_blocking == "auto" and request.target_type not in ("cpu", "meta")
            for tensor in tensors:
                source = tensor.device
                pinned = pins and _type(source) == "cpu" and tensor.is_pinned()
                asynchronous, wait_for = copy_mode(source, request, pinned=pinned)
                append(tensor.to(target, cast_dtype(tensor, dtype), non_blocking=asynchronous))
                if wait_for is not None:
                    waits.add(wait_for)
    except Exception as error:
        raise TransferFailed(tensors[len(out)], error) from error
    if any(type(t) is not torch.Tensor for t in tensors):
        out = [_rewrap(t, m) for t, m in zip(tensors, out, strict=True)]
    return out


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The elements of its storage a tensor reaches: `[start, stop)`."""
    start = int(tensor.storage_offset())
    if tensor.numel() == 0:
        return start, start
    extent = sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return start, start + int(extent) + 1


def _shares_cleanly(members: list[torch.Tensor]) -> bool:
    """Whether views of one storage can be moved as one span and re-viewed on the target."""
    first = members[0]
    return all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout is torch.strided
        and t.dtype is first.dtype
        and not t.requires_grad
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_quantized
        for t in members
    )


def _copy_views(
    members: list[torch.Tensor], request: TransferRequest, waits: set[torch.device]
) -> list[torch.Tensor]:
    """Move distinct tensors sharing one storage as one copy of the span they use."""
    spans = [_span(t) for t in members if t.numel() > 0]
    first = members[0]
    if not spans:
        return _copy_each(members, request, waits)
    low = min(start for start, _ in spans)
    high = max(stop for _, stop in spans)
    flat = first.as_strided((high - low,), (1,), low)
    [moved] = _copy_each([flat], request, waits)
    out = []
    for tensor in members:
        offset = max(tensor.storage_offset() - low, 0)
        view = moved.as_strided(tensor.shape, tensor.stride(), offset)
        out.append(_rewrap(tensor, view))
    return out


# ---------------------------------------------------------------------------------------------
# Coalesced copies

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
#: Unsigned integer dtypes that travel as the signed integer dtype of their size.
_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})
#: The smallest staging buffer, in bytes.
_MIN_STAGING = 64 * 1024
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
class _Packing:
    """Where each packed tensor goes in the buffer, and the tensors that go alone."""

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
    """The dtype a tensor of `dtype` is packed as, or `None`: it goes alone."""
    if dtype in _NATIVE:
        return dtype
    if dtype.is_floating_point or dtype.is_complex or dtype in _UNSIGNED:
        return _SAME_SIZE_INT.get(dtype.itemsize)
    return None  # quantized, bit and sub-byte dtypes go alone


def _plan_packing(
    tensors: Sequence[torch.Tensor],
    *,
    on_cpu: bool,
    source: torch.device | None,
    limit: int | None,
) -> _Packing:
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
    return _Packing(groups, alone, offset)


def _pack(packing: _Packing, tensors: Sequence[torch.Tensor], buffer: torch.Tensor) -> None:
    """Write every group's tensors into its slice of the byte `buffer` (one fused op per group)."""
    for group in packing.groups:
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
    packing: _Packing, buffer: torch.Tensor, results: list[torch.Tensor], dtype: torch.dtype | None
) -> None:
    """Split the moved byte `buffer` into one view per packed tensor, cast to `dtype` if given."""
    for group in packing.groups:
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
    packing: _Packing,
    tensors: Sequence[torch.Tensor],
    request: TransferRequest,
    waits: set[torch.device],
) -> torch.Tensor:
    """Pack into the staging buffer and copy it to the target: one transfer."""
    emulate = _EMULATE is not None
    pin = not emulate and _pinnable(request.target)
    asynchronous, wait_for = copy_mode(_HOST, request, pinned=pin)
    with _STAGING.lock:
        buffer = _STAGING.take(packing.nbytes, pin=pin)[: packing.nbytes]
        _pack(packing, tensors, buffer)
        if emulate:
            moved = buffer.clone()
        else:
            moved = buffer.to(request.target, non_blocking=asynchronous)
        _STAGING.in_flight(_record_event(request.target) if asynchronous else None)
    if wait_for is not None:
        waits.add(wait_for)
    return moved


def _to_host(
    packing: _Packing,
    tensors: Sequence[torch.Tensor],
    source: torch.device,
    request: TransferRequest,
) -> torch.Tensor:
    """Gather on `source`, copy into fresh (pinned) host memory once, and wait for that copy
    right away: the host reads the buffer next (to split it, and to cast it)."""
    gathered = torch.empty(packing.nbytes, dtype=torch.uint8, device=source)
    _pack(packing, tensors, gathered)
    pin = _EMULATE is None and _pinnable(source)
    asynchronous, wait_for = copy_mode(source, request, pinned=pin)
    host = torch.empty(packing.nbytes, dtype=torch.uint8, pin_memory=pin)
    host.copy_(gathered, non_blocking=asynchronous)
    if wait_for is not None:
        _synchronize((wait_for,))
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
    tensors: Sequence[torch.Tensor], request: TransferRequest
) -> tuple[bool, torch.device | None] | None:
    """How packed tensors cross, or `None`: whether they are on `cpu`, and the accelerator they
    come from (`None` when going from the host to the target)."""
    to = request.target_type
    if _EMULATE is not None and to == "cpu":
        return (True, None) if _EMULATE == "to_accelerator" else (True, _HOST)
    if to == "cpu":
        for tensor in tensors:
            if not tensor.is_cpu and not tensor.is_meta:
                return False, tensor.device
        return None
    if to == "meta" and request.coalesce is not True:
        return None
    return True, None


def _coalesced(
    tensors: Sequence[torch.Tensor],
    request: TransferRequest,
    results: list[torch.Tensor],
    waits: set[torch.device],
) -> list[int]:
    """Move what can be packed into `results`; the indices of the tensors left to go alone."""
    everything = list(range(len(tensors)))
    crossing = _crossing(tensors, request)
    if crossing is None:
        return everything
    on_cpu, source = crossing
    limit = None if request.coalesce is True else COALESCE_MAX_BYTES
    packing = _plan_packing(tensors, on_cpu=on_cpu, source=source, limit=limit)
    if not packing.groups or (
        len(tensors) - len(packing.alone) < 2 and request.coalesce is not True
    ):
        return everything
    try:
        if source is None:
            moved = _to_accelerator(packing, tensors, request, waits)
        else:
            moved = _to_host(packing, tensors, source, request)
        _unpack(packing, moved, results, request.dtype)
    except RuntimeError:  # out of memory and the like: go per tensor, which names the culprit
        return everything
    return packing.alone
