"""Moving nested batches and models between devices: `to_device`, `devices_of`, `find_device`.

`to_device` walks the structure once (`devicekit._tree.collect`), moves the tensors that are
not where they should be in one step (`_transfer_leaves`, the only place tensor data moves), and
rebuilds the containers that hold moved tensors (`devicekit._tree.rebuild`). Tensors already on the
target, and containers holding only such tensors, come back as the very same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from itertools import repeat
from operator import is_not
from typing import Any, Literal, TypeVar

import torch

from devicekit._context import current_device
from devicekit._describe import describe_tensor
from devicekit._errors import MixedDevicesError, MoveError, UnmovableError
from devicekit._resolve import CPU, META, resolve
from devicekit._transfer import Coalesce, transfer_tensors
from devicekit._tree import (
    _FLAT,
    _KIND,
    ATOM,
    DATACLASS,
    DICT,
    LEAF_TYPES,
    MODULE,
    NAMEDTUPLE,
    OPAQUE,
    TENSOR,
    NotSimple,
    classify,
    collect,
    flatten_simple,
    path_of,
    rebuild,
    rebuild_simple,
    register_mover,
    render,
    walk,
    with_values,
)
from devicekit._types import DeviceLike

__all__ = ["devices_of", "find_device", "register_mover", "to_device"]

T = TypeVar("T")

NonBlocking = bool | Literal["auto"]

_PLAIN = frozenset({torch.Tensor})  # tensor types `.to()` keeps as they are
_STORAGE = torch.Tensor.untyped_storage
_TO = torch.Tensor.to
# The resolver gives `cpu` and `meta` as these two objects, for quick `is` tests.
_META = META
_CPU = CPU


#: `device.type` by device: reading `torch.device.type` costs about a microsecond each time.
_TYPES: dict[torch.device, str] = {}


def _type(device: torch.device) -> str:
    try:
        return _TYPES[device]
    except KeyError:
        kind = _TYPES[device] = device.type
        return kind


def _target(device: DeviceLike) -> torch.device:
    # `None` is the current default device; any other spec goes to the one resolver.
    return current_device() if device is None else resolve(device, operation="to_device")


def _root_name(obj: Any) -> str:
    return "model" if isinstance(obj, torch.nn.Module) else "batch"


def _cause(error: BaseException) -> str:
    """`OutOfMemoryError: CUDA out of memory`: the first line, without a trailing full stop."""
    lines = str(error).strip().splitlines()
    text = lines[0].rstrip(".!") if lines else ""  # torch's dispatcher lists go on for pages
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _format_bytes(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{nbytes} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# The transfer step


class _TransferFailed(Exception):
    """One tensor failed to move; `to_device` turns this into a `MoveError` with its path."""

    def __init__(self, tensor: torch.Tensor, nbytes: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.tensor = tensor
        self.nbytes = nbytes
        self.cause = cause


def _plan(
    source: torch.device, target: torch.device, pinned: bool, non_blocking: NonBlocking
) -> tuple[bool, torch.device | None]:
    """The safe asynchrony policy for one copy: `(non_blocking, device to synchronise after)`.

    Copies to the host, and to or from MPS, may be issued asynchronously but are always waited for
    (one event per accelerator) before `to_device` returns, so a returned tensor never changes
    under the caller. Host-to-accelerator copies are asynchronous from pinned memory only (under
    `"auto"`), and accelerator-to-accelerator copies are asynchronous (stream-ordered).
    """
    to, source_type = _type(target), _type(source)
    if to == "meta" or source_type == "meta" or source == target:
        return False, None
    asynchronous = non_blocking is not False
    if to == "cpu" or source_type == "mps" or to == "mps":
        accelerator = target if source_type == "cpu" else source
        return asynchronous, (accelerator if asynchronous else None)
    if source_type == "cpu":
        return (pinned if non_blocking == "auto" else asynchronous), None
    return asynchronous, None


def _synchronize(devices: Collection[torch.device]) -> None:
    """Wait for the copies queued so far on each device's current stream: one event each."""
    for device in devices:
        event = torch.Event(device=device)
        event.record(torch.accelerator.current_stream(device))
        event.synchronize()


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype` for floating-point and complex tensors, like `Module.to(dtype)`; else `None`."""
    if dtype is None or not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    return dtype


def _rewrap(original: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Keep an `nn.Parameter` one (its `.to()` returns a plain tensor, as a leaf)."""
    if type(original) is torch.nn.Parameter and type(moved) is not torch.nn.Parameter:
        return torch.nn.Parameter(moved, requires_grad=original.requires_grad)
    return moved


def _copy_each(
    tensors: list[torch.Tensor],
    device: torch.device,
    non_blocking: NonBlocking,
    dtype: torch.dtype | None,
    sync: set[torch.device],
) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    append = out.append
    try:
        to = _type(device)
        if to == "meta" and dtype is None:
            try:
                out = [tensor.to(device) for tensor in tensors]
            except Exception:  # find which one failed
                out = []
                append = out.append
                for tensor in tensors:
                    append(tensor.to(device))
        else:
            for tensor in tensors:
                source = tensor.device
                pinned = (
                    non_blocking == "auto"
                    and to not in ("cpu", "meta")
                    and _type(source) == "cpu"
                    and tensor.is_pinned()
                )
                asynchronous, wait_for = _plan(source, device, pinned, non_blocking)
                append(tensor.to(device, _cast(tensor, dtype), asynchronous))
                if wait_for is not None:
                    sync.add(wait_for)
    except Exception as error:
        failed = tensors[len(out)]
        raise _TransferFailed(failed, failed.nbytes, error) from error
    if not set(map(type, tensors)) <= _PLAIN:
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
        type(t) in LEAF_TYPES
        and t.layout is torch.strided
        and t.dtype is first.dtype
        and not t.requires_grad
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_quantized
        and type(t) in (torch.Tensor, torch.nn.Parameter)
        for t in members
    )


def _copy_views(
    members: list[torch.Tensor],
    device: torch.device,
    non_blocking: NonBlocking,
    dtype: torch.dtype | None,
    sync: set[torch.device],
) -> list[torch.Tensor]:
    """Move distinct tensors sharing one storage as one copy of the span they use."""
    spans = [_span(t) for t in members if t.numel() > 0]
    first = members[0]
    if not spans:
        return _copy_each(members, device, non_blocking, dtype, sync)
    low = min(start for start, _ in spans)
    high = max(stop for _, stop in spans)
    flat = first.as_strided((high - low,), (1,), low)
    [moved] = _copy_each([flat], device, non_blocking, dtype, sync)
    out = []
    for tensor in members:
        offset = max(tensor.storage_offset() - low, 0)
        view = moved.as_strided(tensor.shape, tensor.stride(), offset)
        out.append(_rewrap(tensor, view))
    return out


def _transfer_leaves(
    tensors: list[torch.Tensor],
    device: torch.device,
    *,
    non_blocking: NonBlocking = "auto",
    dtype: torch.dtype | None = None,
    coalesce: Coalesce = "auto",
) -> list[torch.Tensor]:
    """Move tensors to `device`; the only place where `to_device` moves tensor data.

    `tensors` are the tensors that need a copy or a cast, in walk order; the same tensor may
    appear more than once and then comes back as one moved tensor. Tensors sharing a storage
    (views, tied or loaded weights) are moved as one copy of the part of the storage they use and
    come back as views of one moved storage, with the same strides and relative offsets. Views
    that cannot be re-viewed safely (different dtypes over one storage, autograd history,
    conjugate or quantized views) are moved one by one. Copies follow the `_plan` policy and the
    host-bound ones are waited for before returning.

    Tensors that share no storage with another go through `devicekit._transfer.transfer_tensors`,
    which coalesces the small ones between host and accelerator (`coalesce`) and hands the rest
    to `_copy_each`.

    Raises:
        _TransferFailed: A copy failed; `to_device` re-raises it as `MoveError` with a path.
    """
    try:
        storages: list[object] = list(map(_STORAGE, tensors))
    except Exception:  # sparse, nested or wrapper-subclass tensors have no storage to share
        storages = [_storage_or_self(t) for t in tensors]
    keys = list(map(id, storages))  # `storages` keeps every storage alive: ids stay unique
    sync: set[torch.device] = set()

    def alone(rest: list[torch.Tensor]) -> list[torch.Tensor]:
        return _copy_each(rest, device, non_blocking, dtype, sync)

    # Coalescing only pays between host and accelerator: skip its planning for `meta` targets.
    direct = coalesce is False or (coalesce is not True and _type(device) == "meta")

    def transfer(distinct: list[torch.Tensor]) -> list[torch.Tensor]:
        if direct:
            return alone(distinct)
        return transfer_tensors(
            distinct, device, dtype=dtype, non_blocking=non_blocking, coalesce=coalesce, alone=alone
        )

    if len(set(keys)) == len(keys):
        out = transfer(tensors)
    else:
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
                moved = _copy_views(distinct, device, non_blocking, dtype, sync)
            else:
                moved = _copy_each(distinct, device, non_blocking, dtype, sync)
            by_id = {id(t): m for t, m in zip(distinct, moved, strict=True)}
            for position in positions:
                result[position] = by_id[id(tensors[position])]
        by_id = {id(t): m for t, m in zip(singles, transfer(singles), strict=True)}
        for position, tensor in enumerate(tensors):
            if result[position] is None:
                result[position] = by_id[id(tensor)]
        out = result  # type: ignore[assignment]
    if sync:
        _synchronize(sync)
    return out


def _storage_or_self(tensor: torch.Tensor) -> object:
    try:
        return tensor.untyped_storage()
    except Exception:
        return tensor


# ---------------------------------------------------------------------------------------------
# to_device


def _argument_error(message: str, device: torch.device | None) -> MoveError:
    return MoveError(message, path=None, nbytes=None, device=device)


def _skip_arguments(
    skip: Callable[[Any], bool] | Collection[Hashable] | None,
) -> tuple[Callable[[Any], bool] | None, frozenset[Hashable] | None]:
    if skip is None:
        return None, None
    if isinstance(skip, str):
        return None, frozenset({skip})
    if callable(skip):
        return skip, None
    try:
        return None, frozenset(skip)
    except TypeError:
        raise _argument_error(
            f"to_device(skip={skip!r}): expected a predicate (a function of the value) or a "
            "collection of mapping keys, such as skip={'meta', 'text'}.",
            None,
        ) from None


class _Mover:
    """One `to_device` call: the arguments, and how to report an error with a path."""

    __slots__ = ("dtype", "non_blocking", "root", "target")

    def __init__(
        self,
        root: Any,
        target: torch.device,
        non_blocking: NonBlocking,
        dtype: torch.dtype | None,
    ) -> None:
        self.root = root
        self.target = target
        self.non_blocking = non_blocking
        self.dtype = dtype

    def path(self, obj: Any) -> str:
        return render(_root_name(self.root), path_of(self.root, obj))

    def failed(self, failure: _TransferFailed) -> MoveError:
        tensor, cause = failure.tensor, failure.cause
        path = self.path(tensor)
        if isinstance(cause, torch.OutOfMemoryError):
            fix = f"Free memory on {self.target}, or move a smaller batch."
        elif tensor.is_meta:
            fix = "Meta tensors hold no data: create this tensor on a real device instead."
        else:
            fix = "The original error is attached as __cause__."
        return MoveError(
            f"to_device({self.target}): moving {path} ({describe_tensor(tensor)}, "
            f"{_format_bytes(failure.nbytes)}) to {self.target} failed with "
            f"{_cause(cause)}. {fix}",
            path=path,
            nbytes=failure.nbytes,
            device=self.target,
        )

    def call(self, obj: Any, kind: int) -> Any:
        """Move a module (in place, `Module.to`) or an object with its own `.to()`."""
        try:
            if kind == MODULE:
                asynchronous = self.non_blocking is True and _type(self.target) not in (
                    "cpu",
                    "mps",
                )
                return obj.to(device=self.target, dtype=self.dtype, non_blocking=asynchronous)
            moved = obj.to(self.target)
        except Exception as error:
            path = self.path(obj)
            nbytes = None
            if kind == MODULE:
                nbytes = sum(t.nbytes for t in (*obj.parameters(), *obj.buffers()))
            size = "" if nbytes is None else f", {_format_bytes(nbytes)}"
            raise MoveError(
                f"to_device({self.target}): {path} ({type(obj).__name__}{size}).to"
                f"({self.target}) failed with {_cause(error)}. "
                "The original error is attached as __cause__.",
                path=path,
                nbytes=nbytes,
                device=self.target,
            ) from error
        return obj if moved is None else moved

    def unmovable(self, obj: Any, problem: str, cause: BaseException | None) -> UnmovableError:
        path = self.path(obj)
        name = type(obj).__name__
        detail = "" if cause is None else f" ({_cause(cause)})"
        return UnmovableError(
            f"to_device({self.target}): {path} (of type {name}) {problem}{detail}. "
            f"Teach devicekit to rebuild it with devicekit.register_mover({name}, fn), "
            "or give it a .to(device) method.",
            path=path,
            obj=obj,
        )

    def check_opaque(self, obj: Any) -> None:
        """Under `strict=True`: refuse an object devicekit cannot rebuild if it holds tensors."""
        for value, where in walk(obj, look_inside=True):
            if isinstance(value, torch.Tensor):
                path = self.path(obj)
                inside = render(path, where)
                name = type(obj).__name__
                raise UnmovableError(
                    f"to_device({self.target}, strict=True): {path} is of type {name}, which "
                    f"devicekit cannot rebuild, and it holds tensors ({inside}: "
                    f"{describe_tensor(value)}). "
                    f"Make {name} a dataclass, give it a .to(device) method, or call "
                    f"devicekit.register_mover({name}, fn); or pass strict=False to leave "
                    "it as it is.",
                    path=inside,
                    obj=obj,
                )


def _pending(
    leaves: list[torch.Tensor], target: torch.device, dtype: torch.dtype | None
) -> list[torch.Tensor]:
    """The leaves that need a copy or a cast."""
    if dtype is None:
        if target is _CPU:  # `_target` gives these two as one object each
            return [t for t in leaves if not t.is_cpu]
        if target is _META:
            return [t for t in leaves if not t.is_meta]
        return [t for t in leaves if t.device != target]
    return [t for t in leaves if t.device != target or _cast(t, dtype) not in (None, t.dtype)]


def to_device(
    obj: T,
    device: DeviceLike = None,
    *,
    non_blocking: NonBlocking = "auto",
    dtype: torch.dtype | None = None,
    skip: Callable[[Any], bool] | Collection[Hashable] | None = None,
    strict: bool = False,
    coalesce: Coalesce = "auto",
) -> T:
    """Move a tensor, a model, or any nested batch to a device, keeping its structure and types.

    Moved: tensors (subclasses and `nn.Parameter` kept), `nn.Module`s (in place, exactly
    `Module.to`), any object with a callable `.to(device)` (a `.to()` that returns `None` moved
    the object in place, and the object is kept), and the tensors inside `dict`, `OrderedDict`,
    `defaultdict`, other `Mapping`s that can be rebuilt from a dict, `list`, `tuple`,
    namedtuples, `torch.return_types`, `deque`, `set`, `frozenset`, dataclasses (frozen, and
    fields with `init=False`, too) and types registered with `devicekit.register_mover`.
    Everything else is returned as is.

    Containers are rebuilt with their own type (`defaultdict` factories and `deque.maxlen` kept);
    nothing in `obj` is changed, except modules and `.to()`-in-place objects. A tensor already on
    the target comes back as the very same object, as does a container holding only such values.
    The same tensor met twice comes back as one tensor, tensors sharing a storage (views) come
    back as views of one moved storage, and cycles come back as the same cycles. Nesting depth
    is unlimited (no recursion).

    Args:
        obj: What to move.
        device: The target: anything `devicekit.as_device` accepts; `None` means
            `devicekit.current_device()`.
        non_blocking: `"auto"` overlaps copies where that is safe: from pinned host memory to an
            accelerator, and between accelerators. Copies to the host, and to or from MPS, are
            waited for (one event per device) before returning, so a returned tensor never
            changes afterwards. `True` makes every copy asynchronous and `False` every copy
            blocking, with the same guarantee for copies to the host.
        dtype: Cast floating-point and complex tensors (and modules, as `Module.to(dtype)`
            does) to this floating-point or complex dtype; other tensors keep theirs.
        skip: Leave some values untouched: a predicate called with every value (`True` skips
            it, and everything inside it), or a collection of mapping keys (and dataclass field
            names) skipped at any depth.
        strict: Raise `UnmovableError` for an object devicekit cannot rebuild that holds tensors,
            instead of returning it as is.
        coalesce: `"auto"` packs small tensors going between host and accelerator into one
            buffer and moves it with one copy (see the Fast transfers docs); the results are
            the same as per-tensor copies, as views of one buffer that do not overlap. `True`
            packs every tensor that can be packed, whatever its size and also to `meta`;
            `False` copies tensor by tensor.

    Returns:
        The moved object, typed as the input.

    Raises:
        MoveError: A tensor, module or `.to()` call failed (out of memory, a meta tensor has no
            data); the message names its path, size and the target, and the original error is
            the `__cause__`. Also raised for an invalid `dtype`, `non_blocking` or `skip`.
        UnmovableError: A container could not be rebuilt from its moved contents, or, with
            `strict=True`, an object devicekit cannot rebuild holds tensors.
        InvalidDeviceSpecError: `device` is malformed.
        DeviceUnavailableError: `device` is not on this machine.

    Example:
        >>> import torch, devicekit
        >>> batch = {"x": torch.ones(2, 3), "ids": [torch.arange(3), "text"]}
        >>> moved = devicekit.to_device(batch, "meta")
        >>> moved["x"].device, moved["ids"][1]
        (device(type='meta'), 'text')
        >>> devicekit.to_device(batch, "cpu") is batch
        True
    """
    target = _target(device)
    if non_blocking != "auto" and non_blocking is not True and non_blocking is not False:
        raise _argument_error(
            f"to_device({target}, non_blocking={non_blocking!r}): expected 'auto', True or False.",
            target,
        )
    if coalesce != "auto" and coalesce is not True and coalesce is not False:
        raise _argument_error(
            f"to_device({target}, coalesce={coalesce!r}): expected 'auto', True or False.",
            target,
        )
    if dtype is not None and not (
        isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)
    ):
        raise _argument_error(
            f"to_device({target}, dtype={dtype!r}): dtype must be a floating-point or complex "
            "torch.dtype (only such tensors are cast, as Module.to does). Cast integer tensors "
            "yourself, e.g. batch['ids'].to(torch.int32).",
            target,
        )
    if skip is None and not strict:
        kind = _KIND.get(type(obj))
        if kind in _FLAT:  # the common batch: dicts, lists and tuples of tensors
            batch: Any = obj
            values = batch.values() if kind == DICT else batch
            types = set(map(type, values))
            flat = types <= LEAF_TYPES  # one level: no walk at all
            if flat:
                leaves = list(values)
            else:
                try:
                    leaves = flatten_simple(obj)
                except NotSimple:
                    leaves = None
            if leaves is not None:
                plain = not flat or types <= _PLAIN
                return _move_simple(
                    obj, kind, leaves, flat, plain, target, non_blocking, dtype, coalesce
                )
        elif kind in (NAMEDTUPLE, DATACLASS):
            try:
                leaves = flatten_simple(obj)
            except NotSimple:
                pass
            else:
                return _move_simple(
                    obj, kind, leaves, False, True, target, non_blocking, dtype, coalesce
                )
        elif kind == TENSOR:
            tensor: Any = obj
            plain = type(tensor) is torch.Tensor
            return _move_simple(
                obj, kind, [tensor], False, plain, target, non_blocking, dtype, coalesce
            )
        predicate, keys = None, None
    else:
        predicate, keys = _skip_arguments(skip)
        if predicate is not None and predicate(obj):
            return obj
    kind = classify(type(obj))
    if kind <= OPAQUE:
        if strict and kind != ATOM:
            _Mover(obj, target, non_blocking, dtype).check_opaque(obj)
        return obj
    mover = _Mover(obj, target, non_blocking, dtype)
    found = None
    if kind == TENSOR:
        leaves = [obj]
    else:
        found = collect(
            obj,
            kind,
            skip=predicate,
            skip_keys=keys,
            on_opaque=mover.check_opaque if strict else None,
        )
        leaves = found.leaves
    try:
        moved = _move_leaves(
            leaves, target, non_blocking, dtype, coalesce, set(map(type, leaves)) <= _PLAIN
        )
    except _TransferFailed as failure:
        raise mover.failed(failure) from failure.cause
    if found is None:
        return moved[0]  # type: ignore[return-value]
    if moved is leaves and not found.calls:
        return obj
    return rebuild(found, moved, mover.call, mover.unmovable)  # type: ignore[no-any-return]


def _move_simple(
    obj: T,
    kind: int,
    leaves: list[torch.Tensor],
    flat: bool,
    plain: bool,
    target: torch.device,
    non_blocking: NonBlocking,
    dtype: torch.dtype | None,
    coalesce: Coalesce,
) -> T:
    """`to_device` for a lone tensor, or a tree of plain containers that `flatten_simple`
    walked into `leaves`; `flat`: `obj` is a dict, list or tuple of nothing but tensors, and
    `leaves` are its values."""
    try:
        moved = _move_leaves(leaves, target, non_blocking, dtype, coalesce, plain)
    except _TransferFailed as failure:
        raise _Mover(obj, target, non_blocking, dtype).failed(failure) from failure.cause
    if moved is leaves:
        return obj
    if kind == TENSOR:
        return moved[0]  # type: ignore[return-value]
    if not flat:
        try:
            return rebuild_simple(obj, moved)  # type: ignore[no-any-return]
        except RecursionError:  # called close to Python's recursion limit: no recursion then
            mover = _Mover(obj, target, non_blocking, dtype)
            found = collect(obj, kind, skip=None, skip_keys=None, on_opaque=None)
            by_id = dict(zip(map(id, leaves), moved, strict=True))
            in_order = [by_id[id(t)] for t in found.leaves]
            return rebuild(found, in_order, mover.call, mover.unmovable)  # type: ignore[no-any-return]
    if not any(map(is_not, moved, leaves)):  # all on `meta` already
        return obj
    return with_values(obj, kind, moved)  # type: ignore[no-any-return]


def _move_leaves(
    leaves: list[torch.Tensor],
    target: torch.device,
    non_blocking: NonBlocking,
    dtype: torch.dtype | None,
    coalesce: Coalesce,
    plain: bool,
) -> list[torch.Tensor]:
    """Every leaf moved, in order; a leaf already in place is itself, and `leaves` itself comes
    back when none moved. `plain`: all leaves are exactly `torch.Tensor`.

    Raises:
        _TransferFailed: A copy failed.
    """
    if plain and dtype is None and coalesce is not True and target is _META:
        # The common dispatch-only case, checked in C loops: every tensor alone on its storage
        # (storages hash by identity). `.to()` returns a tensor already on `meta` as itself,
        # so no tensor needs checking first.
        try:
            alone_on_storage = len(set(map(_STORAGE, leaves))) == len(leaves)
        except Exception:  # sparse, nested or wrapper-subclass tensors have no storage
            alone_on_storage = False
        if alone_on_storage:
            try:
                return list(map(_TO, leaves, repeat(target)))
            except Exception:  # the general path below names the failing tensor
                pass
    pending = _pending(leaves, target, dtype)
    if not pending:
        return leaves
    moved = _transfer_leaves(
        pending, target, non_blocking=non_blocking, dtype=dtype, coalesce=coalesce
    )
    if len(pending) == len(leaves):
        return moved
    by_id = dict(zip(map(id, pending), moved, strict=True))
    return [by_id.get(id(t), t) for t in leaves]


# ---------------------------------------------------------------------------------------------
# Finding devices


def devices_of(obj: Any) -> dict[torch.device, list[str]]:
    """Where the tensors in `obj` are: each device mapped to the paths of the tensors on it.

    Looks through everything `to_device` moves, and into modules (parameters and buffers) and
    the attributes of `.to()` objects. Devices come in the order they are first met.

    Example:
        >>> import torch, devicekit
        >>> devicekit.devices_of({"x": torch.ones(2), "y": [torch.zeros(1, device="meta")]})
        {device(type='cpu'): ["batch['x']"], device(type='meta'): ["batch['y'][0]"]}
    """
    found: dict[torch.device, list[str]] = {}
    name = _root_name(obj)
    for value, where in walk(obj):
        if isinstance(value, torch.Tensor):
            found.setdefault(value.device, []).append(render(name, where))
    return found


def find_device(obj: Any) -> torch.device | None:
    """The one device all tensors in `obj` are on, or `None` when it holds no tensor.

    Raises:
        MixedDevicesError: The tensors are on several devices; the message lists the paths of
            the tensors on each.

    Example:
        >>> import torch, devicekit
        >>> devicekit.find_device({"x": torch.ones(2), "y": (torch.zeros(1),)})
        device(type='cpu')
    """
    if type(obj) in LEAF_TYPES:
        return obj.device  # type: ignore[no-any-return]
    found = devices_of(obj)
    if len(found) <= 1:
        return next(iter(found), None)
    listed = "; ".join(f"{device}: {_listing(paths)}" for device, paths in found.items())
    raise MixedDevicesError(
        f"find_device(): the tensors are on {len(found)} devices ({listed}). Move them to one "
        "device first, e.g. devicekit.to_device(batch, device).",
        devices=found,
    )


def _listing(paths: list[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    more = len(paths) - limit
    return shown if more <= 0 else f"{shown} and {more} more"
