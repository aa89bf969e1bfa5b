"""Simulated asynchrony: the CPU race finder of `simulated_devices(..., races=True)`.

On the CPU every op is done when it returns, so a stream race cannot show. With `races=True`,
the simulation keeps the one record a GPU's timing would make matter: which stream wrote or
read which bytes, and whether the reader is ordered after that stream's work.

- Each stream counts its work; `event.record(s)` stamps the event with what `s` has done and
  waited for (a vector clock), `s.wait_event(e)`/`s.wait_stream(t)` merge that stamp into `s`'s,
  and a host wait (`synchronize()` of the device, a stream or an event, a true `query()`, a
  blocking copy, `.item()`, `.tolist()`, printing) completes everything the waited stream is
  ordered after.
- A `non_blocking=True` copy between host and device (`.to`, `.cuda`, `copy_`) leaves poison in
  its destination (NaN, the dtype's most negative integer, the largest unsigned one, `True`)
  and keeps the real values aside; they land when an op on the copying stream (or on a stream
  ordered after it) reads them, or when the host waits for it. A copy from pinned memory reads
  its source when it lands, so a source overwritten too early shows in the destination too.
- While a side stream (any stream but a device's default) exists, ops record the bytes they
  write and read, so a side stream that uses what the default stream wrote without waiting for
  it races, and so does the default stream using what a side stream wrote.
- An op that reads bytes whose last write it is not ordered after, or writes bytes that an
  unfinished copy still reads, raises `RaceError` naming both ops, their streams and where each
  was called. The host is never ordered after unfinished work: reading a `non_blocking` copy to
  the host before a wait raises.
- Device memory freed while another stream's use of it is unfinished (no `record_stream`, no
  wait) would be handed to the allocating stream's next allocation on a GPU: the next op after
  the free raises `RaceError`.

Not modelled: writes made before the first side stream existed, and races between two host
threads.
"""

from __future__ import annotations

import sys
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from devicekit import _simulate_mode, _simulate_streams
from devicekit._describe import (
    PASS_THROUGH,
    call_site,
    describe_tensor,
    op_name,
    user_call_site,
    user_frame,
)
from devicekit._errors import RaceError
from devicekit._simulate_mode import _PINNED, _Session, _simulated, _SimulationMode

if TYPE_CHECKING:  # `_simulate_streams` imports this module
    from devicekit._simulate_streams import SimulatedStream, Streams

__all__ = ["Races", "RacingMode", "active"]

#: The active simulation's race state, when it was entered with `races=True`.
active: Races | None = None

#: A vector clock: per stream id, how much of that stream's work is covered.
Stamp = dict[int, int]

# Ops that read no tensor data: metadata, and views (the bytes are read by whatever uses them).
_NO_ACCESS = frozenset(
    {
        "size", "dim", "numel", "stride", "storage_offset", "element_size", "nelement",
        "is_contiguous", "is_floating_point", "is_complex", "is_pinned", "is_shared",
        "get_device", "data_ptr", "untyped_storage", "_typed_storage", "__len__", "__hash__",
        "view", "view_as", "narrow", "select", "unbind", "split", "chunk", "tensor_split",
        "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as",
        "as_strided", "detach", "unflatten", "movedim", "requires_grad_", "__reduce_ex__",
        "record_stream", "__getitem__", "__dlpack_device__",
    }
)  # fmt: skip
# Ops that wait for the current stream before the host goes on (their answer is a host value).
_HOST_WAITS = frozenset(
    {
        "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__",
        "__repr__", "__format__", "nonzero", "equal", "allclose", "masked_select", "unique",
        "unique_consecutive", "numpy", "__array__",
    }
)  # fmt: skip
_COPIES = frozenset({"to", "cpu", "cuda", "xpu", "mps", "copy_"})
#: Ops that hand out memory without writing it.
_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty"})
_HOST = "the host"


def _poison(tensor: torch.Tensor) -> None:
    """Fill `tensor` with what reads of unfinished copies get: NaN, an integer dtype's extreme,
    `True`."""
    dtype = tensor.dtype
    if dtype.is_floating_point or dtype.is_complex:
        value: float | int | bool = float("nan")
    elif dtype is torch.bool:
        value = True
    else:
        info = torch.iinfo(dtype)
        value = info.min if info.min < 0 else info.max
    data = tensor.detach()  # the bytes only: autograd sees no write
    with torch._C.DisableTorchFunction(), torch.no_grad():
        try:
            data.fill_(value)
        except RuntimeError:  # float8 and other dtypes without fill: all bits set
            data.view(torch.uint8).fill_(0xFF)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage a tensor reaches: `[start, stop)`."""
    size = tensor.element_size()
    start = int(tensor.storage_offset()) * size
    if tensor.numel() == 0:
        return start, start
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + extent * size


def _key(tensor: torch.Tensor) -> int:
    """The address of `tensor`'s storage (0 for none: empty, nested or wrapper tensors)."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except Exception:  # sparse, nested and wrapper-subclass tensors have no storage of their own
        return 0


def stamp_of(stream: SimulatedStream) -> Stamp:
    """What an event recorded on `stream` now covers: its own work and all it waited for."""
    stamp = dict(stream._devicekit_seen)
    stamp[stream._devicekit_id] = stream._devicekit_count
    return stamp


def _ordered(reader: SimulatedStream | None, access: _Access) -> bool:
    """Whether work of `reader` (`None`: the host) issued now runs after `access`."""
    if reader is None:
        return False  # the host is ordered only by waits, which drop what they cover
    if reader is access.stream:
        return True
    return reader._devicekit_seen.get(access.stream._devicekit_id, 0) >= access.seq


@dataclass(eq=False)
class _Copy:
    """A `non_blocking` copy that has not landed: its destination holds poison till then.

    The destination is held by its storage's weak reference and its layout, so that the race
    finder keeps no tensor alive that the program let go (memory a GPU would free too).
    """

    storage: weakref.ref[torch.UntypedStorage]
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    #: What lands: a snapshot of the values, or the live pinned source (read when it lands).
    values: torch.Tensor

    @classmethod
    def into(cls, destination: torch.Tensor, values: torch.Tensor) -> _Copy:
        return cls(
            weakref.ref(destination.untyped_storage()),
            destination.dtype,
            int(destination.storage_offset()),
            tuple(destination.shape),
            tuple(destination.stride()),
            values,
        )

    def land(self) -> None:
        storage = self.storage()
        if storage is None:
            return  # freed before it landed: nobody can read it
        with torch._C.DisableTorchFunction(), torch.no_grad():
            destination = torch.empty(0, dtype=self.dtype)
            destination.set_(storage, self.offset, self.size, self.stride)
            destination.copy_(self.values)


@dataclass(eq=False)
class _Access:
    """One write or read of a storage's bytes `[start, stop)` by `stream`'s work number `seq`."""

    write: bool
    stream: SimulatedStream
    seq: int
    start: int
    stop: int
    op: str
    #: The user's file and line that issued it (read from the source only for a message).
    where: tuple[str, int] | None
    copy: _Copy | None = None

    @property
    def site(self) -> str:
        return "" if self.where is None else str(call_site(*self.where))


@dataclass(eq=False)
class _Storage:
    """What the race finder knows of one storage: unfinished accesses, and for device memory
    the stream that allocated it and the streams `record_stream` named."""

    allocated_on: SimulatedStream | None
    description: str
    accesses: list[_Access] = field(default_factory=list)
    recorded: set[int] = field(default_factory=set)
    finalizer: Any = None
    #: Whether a side stream has used it: then every stream's use of it is noted.
    shared: bool = False


def _stream_name(stream: SimulatedStream | None) -> str:
    if stream is None:
        return _HOST
    default = _simulate_streams.active
    kind = (
        "default stream"
        if default is not None and default.defaults[stream.device_index] is stream
        else f"side stream {stream.stream_id}"
    )
    return f"the {kind} of {stream.device}"


def _site() -> str:
    site = user_call_site()
    return "" if site is None else str(site)


def _where() -> tuple[str, int] | None:
    """The user's file and line running now, cheaply (no source read)."""
    frame = user_frame(2)
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


class _Op:
    """The op being run, with its name and the user's line worked out once, when first asked."""

    __slots__ = ("_name", "_where", "func", "suffix")

    def __init__(self, func: Callable[..., Any], suffix: str = "") -> None:
        self.func = func
        self.suffix = suffix
        self._name: str | None = None
        self._where: tuple[str, int] | bool | None = False

    @property
    def name(self) -> str:
        if self._name is None:
            self._name = op_name(self.func) + self.suffix
        return self._name

    @property
    def where(self) -> tuple[str, int] | None:
        if self._where is False:
            self._where = _where()
        return self._where  # type: ignore[return-value]


class Races:
    """The race state of one simulation (kept while a nested simulation pauses it)."""

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.lock = threading.RLock()
        self.storages: dict[int, _Storage] = {}
        #: Frees found unsafe, raised by the next op (a finalizer cannot raise).
        self.hazards: list[str] = []
        #: How many streams besides the default ones exist: while there are any, ops on default
        #: streams record what they touch too.
        self.side_streams = 0

    # --- streams and events (called by `_simulate_streams`) ------------------------------------

    def stream_made(self, stream: SimulatedStream) -> None:
        """A stream was made: a side one until `default_stream_made` says otherwise; it counts
        until it is garbage, so that a test that once made one does not slow all later ones."""
        with self.lock:
            self.side_streams += 1
        stream._devicekit_gone = weakref.finalize(stream, self._stream_gone)

    def default_stream_made(self, stream: SimulatedStream) -> None:
        gone = getattr(stream, "_devicekit_gone", None)
        if gone is not None and gone.detach() is not None:
            self._stream_gone()

    def _stream_gone(self) -> None:
        with self.lock:
            self.side_streams -= 1

    def wait(self, stream: SimulatedStream, stamp: Stamp | None) -> None:
        """`stream.wait_event(e)`: its later work runs after what `e`'s stamp covers."""
        if not stamp:
            return
        seen = stream._devicekit_seen
        with self.lock:
            for key, count in stamp.items():
                if key != stream._devicekit_id and seen.get(key, 0) < count:
                    seen[key] = count

    def host_waits(self, stamp: Stamp | None, device: int | None = None) -> None:
        """The host waited for what `stamp` covers (or for all work of device `device`): those
        copies land, and every later op is ordered after them."""
        with self.lock:
            for key, record in list(self.storages.items()):
                kept = []
                for access in record.accesses:
                    stream = access.stream
                    done = (
                        stream.device_index == device
                        if device is not None
                        else stamp is not None and stamp.get(stream._devicekit_id, 0) >= access.seq
                    )
                    if not done:
                        kept.append(access)
                    elif access.copy is not None:
                        access.copy.land()
                        access.copy = None
                record.accesses = kept
                if not kept and not _on_side_stream(record):
                    self._forget(key, record)

    def land_all(self) -> None:
        """The simulation ends or pauses: its tensors become plain CPU tensors, so every copy
        lands (the device finishes its work) and nothing is watched any more."""
        with self.lock:
            for key, record in list(self.storages.items()):
                for access in record.accesses:
                    if access.copy is not None:
                        access.copy.land()
                        access.copy = None
                self._forget(key, record)

    def _forget(self, key: int, record: _Storage) -> None:
        if self.storages.get(key) is record:
            del self.storages[key]
        record.finalizer = None  # its callback goes with it

    # --- ops (called by `RacingMode`) ----------------------------------------------------------

    def run(
        self,
        call: Callable[..., Any],
        func: Callable[..., Any],
        types_: Any,
        args: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run one op through the simulation, checked against the unfinished work it meets."""
        __tracebackhide__ = True
        if self.hazards:
            self.raise_hazard()
        name = getattr(func, "__name__", "")
        streams = _simulate_streams.active
        copying = name in _COPIES and _non_blocking(args, kwargs)
        side = streams is not None and any(
            stream is not streams.defaults[index] for index, stream in streams.current.items()
        )
        if not (
            self.storages
            or copying
            or side
            or self.side_streams
            or name in _HOST_WAITS
            or name in _COPIES
        ):
            return call(func, types_, args, kwargs)
        if streams is None or (
            name in _NO_ACCESS and not (name == "__getitem__" and _indexes(args))
        ):
            return call(func, types_, args, kwargs)
        return self._run(call, func, name, types_, args, kwargs, streams, copying)

    def _run(
        self,
        call: Callable[..., Any],
        func: Callable[..., Any],
        name: str,
        types_: Any,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        streams: Streams,
        copying: bool,
    ) -> Any:
        __tracebackhide__ = True
        reads, writes = _accessed(name, args, kwargs)
        device, crossing = self._device_of(name, args, kwargs, reads + writes)
        stream = None if device is None else streams.current_of(device.index or 0)
        side = stream is not None and stream is not streams.defaults[stream.device_index]
        # With side streams about, every stream's use is noted (a copy notes its own).
        recording = side or self.side_streams > 0
        note = recording and not crossing
        op = _Op(func)
        with self.lock:  # not held while the op runs: other threads' ops go on meanwhile
            for tensor in reads:
                self._check(tensor, stream, write=False, op=op, note=note, copy=crossing)
            for tensor in writes:
                self._check(tensor, stream, write=True, op=op, note=note, copy=crossing)
            if stream is not None and name in _HOST_WAITS:
                self.host_waits(stamp_of(stream))
        result = call(func, types_, args, kwargs)
        if result is NotImplemented or stream is None:
            return result
        with self.lock:
            if crossing:
                if copying and self._asynchronous(name, args, result):
                    self._copied(_Op(func, "(non_blocking=True)"), name, args, result, stream)
                else:  # a blocking copy between host and device waits for its stream
                    self.host_waits(stamp_of(stream))
            elif recording:
                self._wrote(op, name, result, writes, reads, stream)
            if name in ("to", "copy_") or name == self.session.type:
                self._between_devices(name, args, result, stream, streams)
        return result

    def _between_devices(
        self,
        name: str,
        args: Sequence[Any],
        result: Any,
        stream: SimulatedStream,
        streams: Streams,
    ) -> None:
        """A copy from one device to another runs on the source's current stream, and torch
        makes the destination's current stream wait for it (and the copy for that stream)."""
        destination = args[0] if name == "copy_" else result
        if not isinstance(destination, torch.Tensor):
            return
        device = _simulated(destination)
        if device is None or device.index == stream.device_index:
            return
        other = streams.current_of(device.index or 0)
        self.wait(stream, stamp_of(other))
        self.wait(other, stamp_of(stream))

    def _device_of(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        tensors: list[torch.Tensor],
    ) -> tuple[torch.device | None, bool]:
        """The simulated device whose current stream runs the op, and whether the op is a copy
        between that device and the host."""
        copy = name in ("to", "cpu", "copy_") or name == self.session.type
        if copy and args and isinstance(args[0], torch.Tensor):
            first = _simulated(args[0])
            if name == "copy_":
                source = args[1] if len(args) > 1 else kwargs.get("src")
                other = _simulated(source) if isinstance(source, torch.Tensor) else None
                device = other or first  # a copy runs on the source device's stream
                return device, (first is None) != (other is None)
            target = self._target(name, args, kwargs)
            if first is not None:
                return first, target is None or target.type == "cpu"
            return (target, True) if target is not None and target.type != "cpu" else (None, False)
        for tensor in tensors:
            device = _simulated(tensor)
            if device is not None:
                return device, False
        spec = kwargs.get("device")
        if spec is not None and not isinstance(spec, torch.Tensor):  # a factory
            try:
                return self.session.resolve(spec), False
            except Exception:  # the op itself raises the right error
                return None, False
        return None, False

    def _target(
        self, name: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> torch.device | None:
        """Where `.to(...)`/`.cuda(...)`/`.cpu()` sends its tensor (`None`: nowhere new)."""
        if name == "cpu":
            return torch.device("cpu")
        spec: object = kwargs.get("device")
        if spec is None:
            for value in args[1:]:
                if isinstance(value, torch.Tensor):
                    return _simulated(value) or value.device
                if isinstance(value, (str, torch.device)) or (
                    isinstance(value, int) and type(value) is not bool
                ):
                    spec = value
                    break
        session = self.session
        if name != "to":
            return session.device(session.current) if spec is None else session.resolve(spec)
        if spec is None:
            return None
        try:
            return session.resolve(spec) or torch.device(spec)  # type: ignore[call-overload]
        except Exception:  # the op itself raises the right error for a bad spec
            return None

    def _asynchronous(self, name: str, args: Sequence[Any], result: object) -> bool:
        """Whether a `non_blocking` copy really is asynchronous: to a device always, to the host
        into pinned memory only (`.to("cpu", non_blocking=True)` pins it), and on MPS always."""
        destination = args[0] if name == "copy_" else result
        if not isinstance(destination, torch.Tensor) or (
            destination is args[0] and name != "copy_"
        ):
            return False
        if destination.is_quantized or destination.layout is not torch.strided:
            return False  # not modelled: taken as finished at once
        if _simulated(destination) is not None:
            return True
        return (
            name != "copy_" or self.session.type == "mps" or bool(destination.__dict__.get(_PINNED))
        )

    def _check(
        self,
        tensor: torch.Tensor,
        stream: SimulatedStream | None,
        *,
        write: bool,
        op: _Op,
        note: bool,
        copy: bool,
    ) -> None:
        """Raise if this access races an unfinished one; land copies it is ordered after; note
        the access where a later race or free must know of it (a copy between host and device
        notes its own accesses)."""
        __tracebackhide__ = True
        key = _key(tensor)
        if not key:
            return
        record = self.storages.get(key)
        if record is None and not note:
            return
        start, stop = _span(tensor)
        if record is not None:
            for access in record.accesses:
                if access.stop <= start or stop <= access.start:
                    continue
                if not (access.write or write):
                    continue  # two reads never race
                if not _ordered(stream, access):
                    raise self._race(op.name, tensor, stream, write, access)
                if access.copy is not None:  # ordered after the copy: it has landed
                    access.copy.land()
                    access.copy = None
        if stream is None or copy or not (note or record is not None):
            return
        if record is None:
            device = _simulated(tensor)
            if device is None:
                return  # host memory read by a device op: only copies keep it busy
            record = self._record(key, tensor, self._default(device))
        if note or record.shared or record.allocated_on is not stream:
            self._note(record, stream, write, start, stop, op, None)

    def _record(
        self, key: int, tensor: torch.Tensor, allocated_on: SimulatedStream | None
    ) -> _Storage:
        record = self.storages.get(key)
        if record is None:
            device = _simulated(tensor)
            record = _Storage(allocated_on, describe_tensor(tensor, device))
            self.storages[key] = record
            # Forgotten when the memory is freed, before the allocator can hand its address on.
            storage = tensor.untyped_storage()
            record.finalizer = weakref.ref(storage, lambda _: self._freed(key, record))
        return record

    def _default(self, device: torch.device) -> SimulatedStream:
        streams = _simulate_streams.active
        assert streams is not None
        return streams.default(device.index or 0)

    def _note(
        self,
        record: _Storage,
        stream: SimulatedStream,
        write: bool,
        start: int,
        stop: int,
        op: _Op,
        copy: _Copy | None,
    ) -> _Access:
        stream._devicekit_count += 1
        for access in record.accesses:  # the same work again: only its number moves on
            if (
                copy is None
                and access.copy is None
                and access.stream is stream
                and access.write == write
                and (access.start, access.stop) == (start, stop)
            ):
                access.seq, access.op, access.where = stream._devicekit_count, op.name, op.where
                return access
        count = stream._devicekit_count
        access = _Access(write, stream, count, start, stop, op.name, op.where, copy)
        record.accesses.append(access)
        if not record.shared and not _is_default(stream):
            record.shared = True
        return access

    def _copied(
        self, op: _Op, name: str, args: Sequence[Any], result: Any, stream: SimulatedStream
    ) -> None:
        """A `non_blocking` copy was issued on `stream`: poison its destination till it lands."""
        destination: torch.Tensor = args[0] if name == "copy_" else result
        source = args[1] if name == "copy_" else args[0]
        if not isinstance(source, torch.Tensor):
            return
        on_device = _simulated(destination) is not None
        if not on_device and name != "copy_" and self.session.type != "mps":
            destination.__dict__[_PINNED] = True  # as torch pins `.to("cpu", non_blocking=True)`
        pinned_source = _simulated(source) is None and bool(source.__dict__.get(_PINNED))
        with torch._C.DisableTorchFunction():
            values = source.detach() if pinned_source else destination.detach().clone()
        copy = _Copy.into(destination, values)
        allocated = None
        if on_device:  # `.to()` allocates on the copying stream; `copy_` writes older memory
            allocated = stream if name != "copy_" else self._default(stream.device)
        target = self._record(_key(destination), destination, allocated)
        start, stop = _span(destination)
        self._note(target, stream, True, start, stop, op, copy)
        key = _key(source)
        source_device = _simulated(source)
        if key and (pinned_source or source_device is not None):  # read until it lands
            allocated = None if source_device is None else self._default(source_device)
            owner = self._record(key, source, allocated)
            begin, end = _span(source)
            self._note(owner, stream, False, begin, end, op, None)
        _poison(destination)

    def _wrote(
        self,
        op: _Op,
        name: str,
        result: Any,
        writes: list[torch.Tensor],
        reads: list[torch.Tensor],
        stream: SimulatedStream,
    ) -> None:
        """An op while side streams exist: its new tensors are allocated on its stream, and
        written by it (unless it only hands memory out, as `torch.empty` does)."""
        operands = {_key(tensor) for tensor in reads + writes}
        made = [result] if isinstance(result, torch.Tensor) else []
        if isinstance(result, (list, tuple)):
            made = [item for item in result if isinstance(item, torch.Tensor)]
        allocation = name in _ALLOCATIONS
        for tensor in made:
            key = _key(tensor)
            if not key or key in operands or _simulated(tensor) is None:
                continue  # an input handed back (`contiguous()`), or a view of one
            record = self._record(key, tensor, stream)
            if not allocation:
                start, stop = _span(tensor)
                self._note(record, stream, True, start, stop, op, None)

    def record_stream(self, tensor: torch.Tensor, stream: object) -> None:
        """`tensor.record_stream(stream)`: freeing it waits for `stream`'s work so far."""
        if not isinstance(stream, _simulate_streams.SimulatedStream):
            return
        with self.lock:
            record = self.storages.get(_key(tensor))
            if record is not None:
                record.recorded.add(stream._devicekit_id)

    # --- frees ---------------------------------------------------------------------------------

    def _freed(self, key: int, record: _Storage) -> None:
        """A storage was freed: unsafe if a stream other than its allocator's still uses it."""
        with self.lock:
            record.finalizer = None
            if self.storages.get(key) is not record:
                return  # forgotten already: nothing of it is unfinished
            del self.storages[key]
            owner = record.allocated_on
            if owner is None:
                return
            for access in record.accesses:
                stream = access.stream
                if (
                    stream is owner
                    or stream._devicekit_id in record.recorded
                    or _ordered(owner, access)
                ):
                    continue
                user, allocator = self._spelled(stream), self._spelled(owner)
                self.hazards.append(
                    f"{record.description} was freed while {_stream_name(stream)} may still "
                    f"use it ({access.op}, called from {access.site or 'an unknown line'}). It "
                    f"was allocated on {_stream_name(owner)}, whose next allocation may reuse "
                    "the memory before that use is done. Fix: call "
                    f"tensor.record_stream({user}) where {_stream_name(stream)} uses it, or "
                    f"keep the tensor alive until {allocator}.wait_stream({user}) or a "
                    "synchronize. (Found by devicekit.simulated_devices(..., races=True).)"
                )
                return

    def raise_hazard(self) -> None:
        __tracebackhide__ = True
        with self.lock:
            message, self.hazards = self.hazards[0], []
        raise RaceError(f"Race: {message}", op="free", stream=None, other=None, location=None)

    # --- messages ------------------------------------------------------------------------------

    def _spelled(self, stream: SimulatedStream) -> str:
        """How code names `stream`: `torch.cuda.current_stream()` for a default stream."""
        if not _is_default(stream):
            return "side_stream"
        index = "" if self.session.count == 1 else str(stream.device_index)
        return f"torch.{self.session.type}.current_stream({index})"

    def _race(
        self,
        op: str,
        tensor: torch.Tensor,
        stream: SimulatedStream | None,
        write: bool,
        access: _Access,
    ) -> RaceError:
        site = _site()
        verb = "writes" if write else "reads"
        other = "writing" if access.write else "reading"
        reader = _stream_name(stream)
        writer = _stream_name(access.stream)
        if stream is None:
            fix = (
                f"wait on the host before this {'write' if write else 'read'}: "
                f"torch.{self.session.type}.synchronize(), the copying stream's .synchronize(), "
                f"or .synchronize() of an event recorded on it after the copy"
            )
        else:
            mine, theirs = self._spelled(stream), self._spelled(access.stream)
            fix = (
                f"make {reader} wait for that op first: {mine}.wait_stream({theirs}), or "
                f"{mine}.wait_event(event) with the event recorded on {writer} after that op"
            )
        lines = [
            f"Race: {op} on {reader} {verb} {describe_tensor(tensor, _simulated(tensor))} "
            f"while {access.op} on {writer} may still be {other} it.",
        ]
        if site:
            lines.append(f"  this op: {site}")
        if access.site:
            lines.append(f"  {access.op}: {access.site}")
        if not write:
            effect = "this may read the bytes before they are written (garbage)"
        elif access.write:
            effect = "the unfinished write may land after this one and undo it"
        else:
            effect = "this may overwrite the bytes before the other op has read them"
        lines.append(f"On a GPU {effect}. Fix: {fix}.")
        lines.append("(Found by devicekit.simulated_devices(..., races=True).)")
        return RaceError(
            "\n".join(lines),
            op=op,
            stream=reader,
            other=f"{access.op} on {writer}",
            location=site or None,
        )


def _is_default(stream: SimulatedStream) -> bool:
    streams = _simulate_streams.active
    return streams is None or streams.defaults[stream.device_index] is stream


def _on_side_stream(record: _Storage) -> bool:
    """Whether the storage was allocated on a side stream (its later users are watched)."""
    owner, streams = record.allocated_on, _simulate_streams.active
    return owner is not None and (
        streams is None or streams.defaults[owner.device_index] is not owner
    )


def _indexes(args: Sequence[Any]) -> bool:
    """Whether `tensor[key]` gathers with index tensors or lists (a read, not a view)."""
    if len(args) < 2:
        return False
    parts = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(part, (torch.Tensor, list)) for part in parts)


def _non_blocking(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """The `non_blocking` of a `.to`/`.cuda`/`copy_` call: keyword or first positional bool."""
    if "non_blocking" in kwargs:
        return bool(kwargs["non_blocking"])
    for value in args[1:]:
        if type(value) is bool:
            return value
    return False


def _accessed(
    name: str, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors an op reads and those it writes (in-place ops, `out=`, `__setitem__`)."""
    reads: list[torch.Tensor] = []
    writes: list[torch.Tensor] = []
    for label, tensor in _simulate_mode._operands(args, kwargs):
        in_place = label == "args[0]" and (
            name == "__setitem__"
            or (name.endswith("_") and not name.startswith("__"))
            or (name.startswith("__i") and name not in ("__index__", "__int__", "__invert__"))
        )
        if in_place or label == "out" or label.startswith("out["):
            writes.append(tensor)
        else:
            reads.append(tensor)
    return reads, writes


class RacingMode(_SimulationMode):
    """The simulation's mode with the race finder in front of every op.

    It hands each op on to the simulation's own mode through a small function compiled "at"
    the user's calling line (cached per line): the mode runs torch ops from the frame that
    called it, so warnings torch issues keep naming the user's file, module and line.
    """

    def __init__(self, session: _Session, races: Races) -> None:
        super().__init__(session)
        self.races = races
        #: Per calling line, keyed by the id of its code: that code (kept alive so that its id
        #: stays its own) and the function that runs an op "from" that line.
        self.callers: dict[tuple[int, int], tuple[types.CodeType, Callable[..., Any]]] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types_: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        __tracebackhide__ = True
        caller = _getframe(1)
        found = self.callers.get((id(caller.f_code), caller.f_lineno))
        call = found[1] if found is not None else self._caller(caller)
        if self.session is not _simulate_mode._active or type(func) is _METHOD_WRAPPER:
            return call(func, types_, args, kwargs)
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "record_stream" and len(args) > 1:
            self.races.record_stream(args[0], args[1])
        return self.races.run(call, func, types_, args, kwargs)

    def _caller(self, caller: types.FrameType) -> Callable[..., Any]:
        """A function that runs the simulation's mode on an op, from `caller`'s line."""
        frame: types.FrameType | None = caller
        while frame is not None and frame.f_code.co_filename == _OVERRIDES:
            frame = frame.f_back  # a Python-level torch function's `handle_torch_function`
            frame = frame.f_back if frame is not None else None  # ... and that function
        source = frame if frame is not None else caller
        text = "\n" * (source.f_lineno - 1) + (
            "def _make(base, mode): return lambda f, t, a, k: base(mode, f, t, a, k)"
        )
        namespace: dict[str, Any] = {}
        exec(compile(text, source.f_code.co_filename, "exec"), source.f_globals, namespace)
        made = namespace["_make"](_SimulationMode.__torch_function__, self)
        code = made.__code__.replace(co_name=PASS_THROUGH)  # `user_frame` looks past it
        call: Callable[..., Any] = types.FunctionType(
            code, made.__globals__, PASS_THROUGH, None, made.__closure__
        )
        if len(self.callers) > _MAX_CALLERS:
            self.callers.clear()
        self.callers[(id(caller.f_code), caller.f_lineno)] = (caller.f_code, call)
        return call


_MAX_CALLERS = 10_000
_OVERRIDES = torch.overrides.__file__
_getframe = sys._getframe
_METHOD_WRAPPER = _simulate_mode._METHOD_WRAPPER
