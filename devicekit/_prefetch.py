"""`prefetch`: batches moved to the device ahead of the loop that reads them.

On an accelerator with streams (CUDA, ROCm and XPU, through `torch.accelerator`), each pass
starts one daemon thread that reads the source, pins the tensors that `to_device` copies alone
(the small ones it packs go through its own pinned staging buffer), and issues the copy with
`to_device(..., non_blocking=True)` on a side stream, then records an event after it. At most
`depth` batches are read and not yet handed over. When the loop asks for a batch, its current
stream waits on that batch's event, and every tensor of the batch is tied to that stream with
`record_stream`, so the allocator does not reuse its memory while the loop's kernels may still
read it. Nothing keeps a batch once it is handed over.

The thread holds no reference to the iterator it feeds: when the iterator is closed, left
after `break`, or collected, a `weakref.finalize` sets a stop event, and the thread ends after
the step it is on (every wait in it has a timeout). Anything the source raises travels to the
loop and is raised there as the very same exception object, with the source's frames in its
traceback.

On CPU, MPS and meta there is nothing to overlap with: each batch is moved with `to_device`
when it is asked for, in the loop's thread.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from devicekit._containers import ATOM_TYPES
from devicekit._context import current_device
from devicekit._describe import describe_tensor
from devicekit._errors import InvalidArgumentError
from devicekit._move import _described, _Mover, to_device
from devicekit._paths import render, walk
from devicekit._resolve import resolve
from devicekit._transfer import COALESCE_MAX_BYTES, Coalesce, TransferRequest
from devicekit._tree import (
    OPAQUE,
    TENSOR,
    TO,
    NotSimple,
    classify,
    collect,
    flatten_simple,
    rebuild,
    rebuild_simple,
)
from devicekit._types import DeviceLike

__all__ = ["Prefetcher", "prefetch"]

T = TypeVar("T")

#: Seconds between two looks at the stop event while a thread waits (a queue, a free slot).
_POLL = 0.05
#: Seconds `close()` waits for the thread to end after its current step.
_JOIN = 120.0
#: Device types whose copies cannot overlap with compute through streams here.
_NO_STREAMS = frozenset({"cpu", "meta", "mps"})
_NAMES = itertools.count()


def _streams(target: torch.device) -> bool:
    """Whether batches for `target` are copied on a side stream (the current accelerator's)."""
    if target.type in _NO_STREAMS:
        return False
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator is not None and accelerator.type == target.type


# ---------------------------------------------------------------------------------------------
# Taking a batch's tensors out and putting others in


def _tensors(batch: Any, target: torch.device) -> tuple[list[torch.Tensor], Callable[..., Any]]:
    """The tensors of `batch` in `to_device`'s walk order, and how to rebuild `batch` around
    others in their place (`rebuild(new_tensors)`); the same walks `to_device` uses."""
    try:
        leaves = flatten_simple(batch)
    except NotSimple:
        pass
    else:

        def simple(new: list[torch.Tensor]) -> Any:
            return rebuild_simple(batch, leaves, new)

        return leaves, simple
    kind = classify(type(batch))
    if kind <= OPAQUE:
        return [], lambda new: batch
    mover = _Mover(batch, TransferRequest(target))
    if kind == TENSOR:
        return [batch], lambda new: new[0]
    found = collect(
        batch, kind, skip=None, skip_keys=None, on_opaque=None, unmovable=mover.unmovable
    )

    def general(new: list[torch.Tensor]) -> Any:
        return rebuild(found, new, lambda obj, kind: obj, mover.unmovable)

    return found.leaves, general


def _every_tensor(batch: Any) -> list[torch.Tensor]:
    """Every tensor in `batch`, those inside objects with their own `.to()` included."""
    try:
        return flatten_simple(batch)
    except NotSimple:
        return [value for value, _ in walk(batch) if isinstance(value, torch.Tensor)]


def _pinned(
    batch: Any, leaves: list[torch.Tensor], rebuild_with: Callable[..., Any], coalesce: Coalesce
) -> Any:
    """`batch` (whose tensors are `leaves`) with the host tensors `to_device` copies alone in
    pinned memory: those too large to pack (or all of them, with `coalesce=False`), each alone
    on its storage so that views keep sharing one."""
    limit = -1 if coalesce is False else None if coalesce is True else COALESCE_MAX_BYTES
    storages: dict[int, int] = {}
    for tensor in {id(t): t for t in leaves}.values():
        if tensor.is_cpu and tensor.layout is torch.strided:
            key = id(tensor.untyped_storage())
            storages[key] = storages.get(key, 0) + 1
    pinned: dict[int, torch.Tensor] = {}
    for tensor in leaves:
        if (
            id(tensor) in pinned
            or not tensor.is_cpu
            or tensor.layout is not torch.strided
            or storages[id(tensor.untyped_storage())] > 1
            or (
                tensor.is_contiguous()
                and type(tensor) is torch.Tensor
                and (limit is None or tensor.nbytes <= limit)
            )
            or tensor.is_pinned()
        ):
            continue
        pinned[id(tensor)] = tensor.pin_memory()
    if not pinned:
        return batch
    return rebuild_with([pinned.get(id(t), t) for t in leaves])


# ---------------------------------------------------------------------------------------------
# The thread that reads and copies ahead


@dataclass(slots=True)
class _Ready:
    """A batch whose copy is issued: hand it over once the loop's stream waits on `event`."""

    batch: Any
    event: torch.Event
    tensors: list[torch.Tensor]  # the batch's tensors on the target, for `record_stream`
    leaves: list[torch.Tensor]  # static buffers only: every tensor, in walk order
    rebuild: Callable[..., Any] | None  # static buffers only: the batch around other tensors
    source: Any  # the pinned host batch, kept until the hand-over


@dataclass(slots=True)
class _Failure:
    error: BaseException


_END = object()


@dataclass(frozen=True, slots=True)
class _Copier:
    """What the thread does with each batch: pin it, and copy it on `stream`."""

    target: torch.device
    stream: torch.Stream
    pin: bool
    coalesce: Coalesce
    static: bool

    def __call__(self, batch: Any) -> _Ready:
        found, rebuild_found = _tensors(batch, self.target)
        source = _pinned(batch, found, rebuild_found, self.coalesce) if self.pin else batch
        # Tensors on other accelerators were written on their current streams (the loader ran
        # in this thread): the side stream reads them only after that work.
        others = {t.device for t in found if not t.is_cpu and t.device != self.target}
        for device in others:
            if device.type == self.target.type:
                self.stream.wait_stream(torch.accelerator.current_stream(device))
        with self.stream:
            moved = to_device(source, self.target, non_blocking=True, coalesce=self.coalesce)
            event = torch.Event(device=self.target)
            event.record(self.stream)
        every = {id(t): t for t in _every_tensor(moved)}.values()
        on_target = [t for t in every if t.device == self.target]
        if not self.static:
            return _Ready(moved, event, on_target, [], None, source)
        leaves, rebuild_with = _tensors(moved, self.target)
        return _Ready(moved, event, on_target, leaves, rebuild_with, source)


def _produce(
    source: Iterator[Any],
    out: queue.SimpleQueue[Any],
    stop: threading.Event,
    slots: threading.Semaphore,
    copy: _Copier,
) -> None:
    """The thread's body: read, copy and queue until the source ends, fails, or `stop` is set."""
    try:
        while True:
            while not slots.acquire(timeout=_POLL):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                batch = next(source)
            except StopIteration:
                out.put(_END)
                return
            out.put(copy(batch))
            del batch
    except BaseException as error:  # raised in the loop's thread, KeyboardInterrupt included
        out.put(_Failure(error))
    finally:
        close = getattr(source, "close", None)
        if stop.is_set() and callable(close):  # left early: run a generator's `finally`
            with contextlib.suppress(Exception):  # nobody is left to tell
                close()


def _stop(stop: threading.Event, slots: threading.Semaphore, out: queue.SimpleQueue[Any]) -> None:
    """End a pass: the thread stops after its current step; queued batches are dropped."""
    stop.set()
    slots.release()  # wakes a thread waiting for a slot at once
    while True:
        try:
            out.get_nowait()
        except queue.Empty:
            return


# ---------------------------------------------------------------------------------------------
# One pass


class _Static:
    """The device buffers of `static=True`: made from the first batch, refilled from the rest."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] | None = None
        self.shape: list[tuple[type, Any]] = []  # the first batch's `_shape`

    def fill(self, batch: Any, leaves: list[torch.Tensor], number: int) -> list[torch.Tensor]:
        """The buffers, holding `leaves`' values; one `_foreach_copy_` per device and dtype.

        Raises:
            InvalidArgumentError: `batch` differs from the first in structure, shapes, dtypes or
                devices; the message names the first path that differs.
        """
        shape = _shape(batch)
        buffers = self.buffers
        if buffers is None:
            for value, where in walk(batch):
                if classify(type(value)) == TO:
                    raise InvalidArgumentError(
                        f"prefetch(static=True): {render('batch', where)} "
                        f"({type(value).__name__}) moves with its own .to(), so its tensors "
                        "cannot be refilled in place. Put its tensors in a dict (e.g. "
                        "dict(encoding)) in the loader's collate_fn, or pass static=False."
                    )
            made: dict[int, torch.Tensor] = {}
            buffers = [made.setdefault(id(t), torch.empty_like(t)) for t in leaves]
            self.buffers, self.shape = buffers, shape
        elif shape != self.shape or not all(
            t.shape == b.shape and t.dtype == b.dtype and t.device == b.device
            for t, b in zip(leaves, buffers, strict=True)
        ):
            raise self.changed(batch, number)
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Any], list[Any]]] = {}
        seen: set[int] = set()
        for buffer, tensor in zip(buffers, leaves, strict=True):
            if id(buffer) in seen:
                continue
            seen.add(id(buffer))
            into, values = groups.setdefault((buffer.device, buffer.dtype), ([], []))
            into.append(buffer)
            values.append(tensor)
        for into, values in groups.values():
            torch._foreach_copy_(into, values)
        return buffers

    def changed(self, batch: Any, number: int) -> InvalidArgumentError:
        """The error for a batch unlike the first, naming the first path that differs."""
        assert self.buffers is not None
        tensors = iter(self.buffers)
        was = [
            (render("batch", where), next(tensors) if issubclass(kind, torch.Tensor) else kind)
            for kind, where in self.shape
        ]
        now = [
            (render("batch", where), value if isinstance(value, torch.Tensor) else type(value))
            for value, where in walk(batch)
            if type(value) not in ATOM_TYPES
        ]
        fix = (
            "A captured graph reads the same buffers every step: make the loader yield the same "
            "structure, shapes and dtypes (drop_last=True, padding to one length), or pass "
            "static=False."
        )
        head = "prefetch(static=True):"
        for (old_path, old), (new_path, new) in zip(was, now, strict=False):
            if old_path != new_path:
                return InvalidArgumentError(
                    f"{head} batch {number} holds {new_path} where batch 0 held {old_path}. {fix}"
                )
            if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
                if old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
                    return InvalidArgumentError(
                        f"{head} {new_path} of batch {number} is {describe_tensor(new)}, but its "
                        f"static buffer (from batch 0) is {describe_tensor(old)}. {fix}"
                    )
            elif _kind_name(old) != _kind_name(new):
                return InvalidArgumentError(
                    f"{head} in batch {number}, {new_path} is {_kind_name(new)}, but in batch 0 "
                    f"it was {_kind_name(old)}. {fix}"
                )
        if len(now) > len(was):
            path, value = now[len(was)]
            return InvalidArgumentError(
                f"{head} batch {number} holds {path} ({_kind_name(value)}), which batch 0 did "
                f"not have. {fix}"
            )
        path, value = was[len(now)]
        return InvalidArgumentError(
            f"{head} batch {number} has no {path} ({_kind_name(value)}), which batch 0 had. {fix}"
        )


def _shape(batch: Any) -> list[tuple[type, Any]]:
    """The structure of `batch`: the type and path of every value but atoms (`str`, `int`,
    `None`, ...), in walk order. Paths are tuples of keys and step functions: two batches have
    the same structure when these lists are equal."""
    return [(type(value), where) for value, where in walk(batch) if type(value) not in ATOM_TYPES]


def _kind_name(value: Any) -> str:
    """`a tensor`, or the type of `value` (or `value` itself, when a type) with its article."""
    if isinstance(value, torch.Tensor):
        return "a tensor"
    name = value.__name__ if isinstance(value, type) else type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


class _Pass(Generic[T]):
    """One pass over the source with a thread copying ahead on a side stream."""

    def __init__(self, source: Iterator[Any], owner: Prefetcher[T], stream: torch.Stream) -> None:
        self._target = owner.device
        self._static = owner._static_buffers if owner.static else None
        self._number = 0
        self._done = False
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._slots = threading.Semaphore(owner.depth)
        copy = _Copier(owner.device, stream, owner.pin, owner.coalesce, owner.static)
        self._thread = threading.Thread(
            target=_produce,
            args=(source, self._out, self._stop, self._slots, copy),
            name=f"devicekit-prefetch-{next(_NAMES)}",
            daemon=True,
        )
        self._finalizer = weakref.finalize(self, _stop, self._stop, self._slots, self._out)
        self._thread.start()

    def __iter__(self) -> _Pass[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            item = self._take()
        except BaseException:  # KeyboardInterrupt while waiting: the pass ends
            self._end(wait=False)
            raise
        if type(item) is _Ready:
            self._slots.release()
            stream = torch.accelerator.current_stream(self._target)
            stream.wait_event(item.event)
            for tensor in item.tensors:
                tensor.record_stream(stream)
            number, self._number = self._number, self._number + 1
            if self._static is not None and item.rebuild is not None:
                buffers = self._static.fill(item.batch, item.leaves, number)
                return item.rebuild(buffers)  # type: ignore[no-any-return]
            return item.batch  # type: ignore[no-any-return]
        self._end(wait=True)  # the thread is returning
        if type(item) is _Failure:
            raise item.error
        raise StopIteration

    def _take(self) -> Any:
        while True:
            try:
                return self._out.get(timeout=_POLL)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._out.get_nowait()
                    except queue.Empty:
                        return _END

    def close(self) -> None:
        """End the pass: stop the thread after its current step and wait for it to end."""
        self._end(wait=True)

    def _end(self, *, wait: bool) -> None:
        self._done = True
        self._finalizer()
        if wait and self._thread is not threading.current_thread():
            self._thread.join(_JOIN)


class _PlainPass(Generic[T]):
    """A pass where nothing overlaps: each batch moved when it is asked for (no references
    kept between steps, unlike a generator's frame)."""

    def __init__(self, source: Iterator[Any], owner: Prefetcher[T]) -> None:
        self._source: Iterator[Any] | None = source
        self._target = owner.device
        self._coalesce = owner.coalesce
        self._static = owner._static_buffers if owner.static else None
        self._number = 0

    def __iter__(self) -> _PlainPass[T]:
        return self

    def __next__(self) -> T:
        if self._source is None:
            raise StopIteration
        try:
            batch = next(self._source)
        except BaseException:
            self._source = None
            raise
        moved = to_device(batch, self._target, coalesce=self._coalesce)
        del batch
        number, self._number = self._number, self._number + 1
        if self._static is None:
            return moved  # type: ignore[no-any-return]
        leaves, rebuild_with = _tensors(moved, self._target)
        return rebuild_with(self._static.fill(moved, leaves, number))  # type: ignore[no-any-return]

    def close(self) -> None:
        """End the pass (and close the source, if it is a generator)."""
        source, self._source = self._source, None
        close = getattr(source, "close", None)
        if callable(close):
            close()


# ---------------------------------------------------------------------------------------------
# The public object


class Prefetcher(Generic[T]):
    """What `prefetch` returns: iterate it for batches on `device`.

    Each `iter()` starts a new pass over the source (and a new thread where streams are used).
    Attributes it does not have itself (`sampler`, `dataset`, `batch_size`, ...) are read from
    the source.

    Attributes:
        source: The wrapped iterable.
        device: The device batches arrive on.
        depth: The most batches read ahead and not yet handed over.
        pin: Whether host tensors are pinned before they are copied.
        coalesce: `to_device`'s `coalesce`.
        static: Whether every batch arrives in the same device buffers.
    """

    def __init__(
        self,
        source: Iterable[T],
        device: torch.device,
        depth: int,
        pin: bool,
        coalesce: Coalesce,
        static: bool,
    ) -> None:
        self.source = source
        self.device = device
        self.depth = depth
        self.pin = pin
        self.coalesce = coalesce
        self.static = static
        self._static_buffers = _Static()
        self._stream: torch.Stream | None = None

    def __iter__(self) -> Iterator[T]:
        source = iter(self.source)
        if not _streams(self.device):
            return _PlainPass(source, self)
        if self._stream is None:
            self._stream = torch.Stream(device=self.device)
        return _Pass(source, self, self._stream)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the source, or of its sampler (a `DistributedSampler`'s shuffle).

        Raises:
            InvalidArgumentError: Neither the source nor its sampler has `set_epoch`.
        """
        source = self.source
        own = getattr(source, "set_epoch", None)
        if callable(own):
            own(epoch)
            return
        found = False
        samplers = (
            getattr(source, "sampler", None),
            getattr(getattr(source, "batch_sampler", None), "sampler", None),
        )
        for sampler in {id(s): s for s in samplers if s is not None}.values():
            method = getattr(sampler, "set_epoch", None)
            if callable(method):
                method(epoch)
                found = True
        if not found:
            raise InvalidArgumentError(
                f"prefetch(...).set_epoch({epoch!r}): the source, {_kind_name(type(source))}, "
                "has no set_epoch method and no sampler with one. Call set_epoch on the "
                "sampler that shuffles, or leave it out."
            )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("source", "_static_buffers", "_stream"):
            raise AttributeError(name)
        try:
            return getattr(self.source, name)
        except AttributeError as error:
            raise AttributeError(
                f"'Prefetcher' object has no attribute {name!r}, and neither has its source "
                f"({_kind_name(type(self.source))})"
            ) from error

    def __repr__(self) -> str:
        return f"prefetch({self.source!r}, {str(self.device)!r}, depth={self.depth})"


class _SizedPrefetcher(Prefetcher[T]):
    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]


def prefetch(
    iterable: Iterable[T],
    device: DeviceLike = None,
    *,
    depth: int = 2,
    pin: bool = True,
    coalesce: Coalesce = "auto",
    static: bool = False,
) -> Prefetcher[T]:
    """Iterate over `iterable` with every batch already on `device`, copied ahead of the loop.

    On an accelerator with streams (CUDA, ROCm, XPU), a background thread reads the source,
    pins the host tensors and copies each batch on a side stream while the loop computes on
    the previous ones; the loop's stream waits for a batch's copy when it takes the batch, and
    the batch's memory is tied to that stream (`record_stream`), so it is not reused while the
    loop's kernels may still read it. On CPU, MPS and meta, each batch is moved with
    `to_device` when the loop asks for it. Batches are moved as `to_device` moves them (nested
    structures, the same types, small tensors coalesced).

    The result can be iterated again when the source can (a `DataLoader`: each pass is a new
    epoch), has `len()` when the source has, forwards `set_epoch` to the source or its sampler,
    and reads other attributes (`sampler`, `dataset`) from the source. Leaving the loop early
    (`break`, an exception, `KeyboardInterrupt`) stops the thread after its current step, as
    does dropping the iterator; what the source raises is raised in the loop, as the same
    exception with the source's frames in its traceback, after the batches before it.

    Args:
        iterable: The batches: a `DataLoader`, a generator, a list, any iterable.
        device: Where the batches go: anything `devicekit.as_device` accepts; `None` means
            `devicekit.current_device()` when `prefetch` is called.
        depth: The most batches read and copied ahead of the loop (at least 1).
        pin: Pin host tensors before copying them (the tensors `to_device` copies alone; the
            small ones it packs go through its own pinned buffer). Only with streams.
        coalesce: As in `to_device`: `"auto"` packs small tensors into one copy.
        static: Hand every batch over in the same device tensors (made from the first batch,
            refilled with one grouped copy per device and dtype), so that a captured CUDA
            graph reading them sees each new batch. Batches must then keep their structure,
            shapes and dtypes.

    Returns:
        An iterable of the moved batches (a `Prefetcher`).

    Raises:
        InvalidArgumentError: `iterable` is not iterable, or `depth`, `pin`, `coalesce` or
            `static` has a value `prefetch` does not take; with `static=True`, when iterating,
            a batch whose structure, shapes or dtypes differ from the first.
        InvalidDeviceSpecError: `device` is malformed.
        DeviceUnavailableError: `device` is not on this machine.

    Example:
        >>> import torch, devicekit
        >>> loader = [{"x": torch.ones(2, 3), "y": torch.zeros(2)} for _ in range(3)]
        >>> batches = devicekit.prefetch(loader, "meta", depth=2)
        >>> len(batches), [batch["x"].device.type for batch in batches]
        (3, ['meta', 'meta', 'meta'])
    """
    if not (hasattr(type(iterable), "__iter__") or hasattr(type(iterable), "__getitem__")):
        raise InvalidArgumentError(
            f"prefetch(iterable={iterable!r}): expected an iterable of batches (a DataLoader, a "
            f"generator, a list), got {_described(iterable)}. Pass the loader itself, e.g. "
            "devicekit.prefetch(loader, 'cuda')."
        )
    if type(depth) is not int or depth < 1:
        raise InvalidArgumentError(
            f"prefetch(depth={depth!r}): expected a whole number of batches to copy ahead, at "
            f"least 1, got {_described(depth)}. Pass depth=2 (the default) or more."
        )
    for name, value in (("pin", pin), ("static", static)):
        if value is not True and value is not False:
            raise InvalidArgumentError(
                f"prefetch({name}={value!r}): expected True or False, got {_described(value)}."
            )
    if coalesce != "auto" and coalesce is not True and coalesce is not False:
        raise InvalidArgumentError(
            f"prefetch(coalesce={coalesce!r}): expected 'auto', True or False, got "
            f"{_described(coalesce)}. Pass coalesce='auto' (the default) or a bool."
        )
    target = current_device() if device is None else resolve(device, operation="prefetch")
    kind = _SizedPrefetcher if hasattr(type(iterable), "__len__") else Prefetcher
    return kind(iterable, target, depth, pin, coalesce, static)
