"""Moving nested batches and models between devices: `to_device` (`devices_of` and
`find_device`, which report where tensors are, live in `devicekit._paths`).

`to_device` checks its arguments into one `TransferRequest`, walks the structure once
(`devicekit._tree.collect`), hands every tensor it found to `devicekit._transfer.move_leaves` (the
only place tensor data moves, and the one owner of `non_blocking`), and rebuilds the containers
that hold moved tensors (`devicekit._tree.rebuild`). Tensors already on the target, and
containers holding only such tensors, come back as the very same objects.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from operator import is_not
from typing import Any, TypeVar

import torch

from devicekit._context import current_device
from devicekit._describe import describe_tensor
from devicekit._errors import InvalidArgumentError, MoveError, UnmovableError
from devicekit._resolve import resolve
from devicekit._transfer import (
    Coalesce,
    NonBlocking,
    TransferFailed,
    TransferRequest,
    cast_dtype,
    copy_mode,
    move_leaves,
)
from devicekit._tree import (
    ATOM,
    DATACLASS,
    DICT,
    FLAT,
    KIND_OF,
    LEAF_TYPES,
    LIST,
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
    render,
    skips,
    walk,
    with_values,
)
from devicekit._types import DeviceLike

__all__ = ["covers_storage", "move_module", "to_device"]

T = TypeVar("T")

_PLAIN = frozenset({torch.Tensor})  # tensor types `.to()` keeps as they are


def _target(device: DeviceLike) -> torch.device:
    # `None` is the current default device; any other spec goes to the one resolver.
    return current_device() if device is None else resolve(device, operation="to_device")


def _root_name(obj: Any) -> str:
    return "model" if isinstance(obj, torch.nn.Module) else "batch"


#: The most characters of an original error that a message quotes (see `_cause`).
_CAUSE_CHARS = 200


def _cause(error: BaseException) -> str:
    """`OutOfMemoryError: CUDA out of memory`: the first line, without a trailing full stop,
    cut to the whole sentences that fit in `_CAUSE_CHARS` (torch's dispatcher errors list every
    backend on one line); the whole error stays attached as `__cause__`."""
    lines = str(error).strip().splitlines()
    text = lines[0].rstrip(".!") if lines else ""
    if len(text) > _CAUSE_CHARS:
        sentences = text.split(". ")
        kept = sentences[0]
        for sentence in sentences[1:]:
            if len(kept) + 2 + len(sentence) > _CAUSE_CHARS:
                break
            kept = f"{kept}. {sentence}"
        text = kept if len(kept) <= _CAUSE_CHARS else kept[: _CAUSE_CHARS - 3].rstrip() + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _format_bytes(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{nbytes} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# to_device


#: Requests already checked, by `(target, non_blocking, dtype, coalesce)`: most programs use one
#: or two, and a hit costs less than checking the arguments again.
_REQUESTS: dict[tuple[Any, ...], TransferRequest] = {}


def _request(target: torch.device, non_blocking: Any, dtype: Any, coalesce: Any) -> TransferRequest:
    """The checked `TransferRequest` for these arguments of `to_device`.

    Raises:
        InvalidArgumentError: `non_blocking`, `coalesce` or `dtype` is not a value
            `to_device` accepts.
    """
    key = (target, non_blocking, dtype, coalesce)
    try:
        request = _REQUESTS[key]
    except (KeyError, TypeError):  # unhashable arguments are checked (and refused) below
        pass
    else:  # `1 == True` and `0 == False` hash alike: the very objects must match
        if request.non_blocking is non_blocking and request.coalesce is coalesce:
            return request
    for name, value in (("non_blocking", non_blocking), ("coalesce", coalesce)):
        if value != "auto" and value is not True and value is not False:
            raise InvalidArgumentError(
                f"to_device({target}, {name}={value!r}): expected 'auto', True or False, got "
                f"{_described(value)}. Pass {name}='auto' (the default) or a bool."
            )
    if dtype is not None and not (
        isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)
    ):
        raise InvalidArgumentError(
            f"to_device({target}, dtype={dtype!r}): expected a floating-point or complex "
            "torch.dtype (only such tensors are cast, as Module.to does), got "
            f"{dtype if isinstance(dtype, torch.dtype) else _described(dtype)}. Pass e.g. "
            "dtype=torch.float16, and cast integer tensors "
            "yourself, e.g. batch['ids'].to(torch.int32)."
        )
    request = TransferRequest(target, non_blocking, dtype, coalesce)
    if len(_REQUESTS) >= 64:
        _REQUESTS.clear()
    _REQUESTS[key] = request
    return request


def _described(value: object) -> str:
    """`'yes' (a str)`: a value and its type, for messages about arguments."""
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{value!r} ({article} {kind})"


def _skip_arguments(
    skip: Callable[[Any], bool] | Collection[Hashable] | None, target: torch.device
) -> tuple[Callable[[Any], bool] | None, frozenset[Hashable] | None]:
    if skip is None:
        return None, None
    if isinstance(skip, str):
        return None, frozenset({skip})
    if callable(skip):
        return skip, None
    try:
        return None, frozenset(skip)
    except TypeError as error:
        raise InvalidArgumentError(
            f"to_device({target}, skip={skip!r}): expected a predicate (a function of the "
            "value) or a collection of hashable mapping keys, got "
            f"{_described(skip)}. Pass e.g. "
            "skip={'meta', 'text'} or skip=lambda value: isinstance(value, str)."
        ) from error


class _Mover:
    """One `to_device` call: the arguments, and how to report an error with a path."""

    __slots__ = ("request", "root", "target")

    def __init__(self, root: Any, request: TransferRequest) -> None:
        self.root = root
        self.request = request
        self.target = request.target

    def path(self, obj: Any) -> str:
        return render(_root_name(self.root), path_of(self.root, obj))

    def failed(self, failure: TransferFailed) -> MoveError:
        tensor, cause, target = failure.tensor, failure.cause, self.target
        path = self.path(tensor)
        if isinstance(cause, torch.OutOfMemoryError):
            fix = f"Free memory on {target}, or move a smaller batch."
        elif tensor.is_meta:
            fix = "Meta tensors hold no data: create this tensor on a real device instead."
        elif tensor.is_quantized:
            fix = (
                f"torch has no quantized kernels for {target}: dequantize it first "
                f"({path}.dequantize()), or leave it where it is with skip=. The original "
                "error is attached as __cause__."
            )
        else:
            fix = "The original error is attached as __cause__."
        size = "" if failure.nbytes is None else f", {_format_bytes(failure.nbytes)}"
        return MoveError(
            f"to_device({target}): moving {path} ({describe_tensor(tensor)}{size}) to {target} "
            f"failed with {_cause(cause)}. {fix}",
            path=path,
            nbytes=failure.nbytes,
            device=target,
        )

    def call(self, obj: Any, kind: int) -> Any:
        """Move a module (in place, `Module.to`) or an object with its own `.to()`."""
        request = self.request
        try:
            if kind == MODULE:
                asynchronous, _ = copy_mode(None, request)
                return move_module(obj, self.target, request.dtype, asynchronous)
            if request.dtype is not None:
                self.check_cast(obj)
            moved = obj.to(self.target)
        except UnmovableError:
            raise
        except Exception as error:
            path = self.path(obj)
            nbytes = None
            fix = "The original error is attached as __cause__."
            if kind == MODULE:
                tensors = (*obj.parameters(), *obj.buffers())
                nbytes = sum(t.nbytes for t in tensors)
                if self.target.type != "meta" and any(t.is_meta for t in tensors):
                    fix = (
                        f"Its meta tensors hold no data: give them memory with "
                        f"devicekit.materialize({path}, {str(self.target)!r}) (built under "
                        "devicekit.deferred(), it gets the values eager construction gives). " + fix
                    )
            size = "" if nbytes is None else f", {_format_bytes(nbytes)}"
            raise MoveError(
                f"to_device({self.target}): {path} ({type(obj).__name__}{size}).to"
                f"({self.target}) failed with {_cause(error)}. {fix}",
                path=path,
                nbytes=nbytes,
                device=self.target,
            ) from error
        return obj if moved is None else moved

    def unmovable(
        self, obj: Any, problem: str, cause: BaseException | None, *, fix: str | None = None
    ) -> UnmovableError:
        path = self.path(obj)
        name = type(obj).__name__
        detail = "" if cause is None else f" ({_cause(cause)})"
        if fix is None:
            fix = (
                f"Teach devicekit to rebuild it with devicekit.register_mover({name}, fn), "
                "or give it a .to(device) method."
            )
        return UnmovableError(
            f"to_device({self.target}): {path} (of type {name}) {problem}{detail}. {fix}",
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

    def check_cast(self, obj: Any) -> None:
        """With `dtype=`: refuse a `.to()` object holding tensors that `dtype` would cast.

        devicekit calls such an object's `.to(device)` and cannot know how its `.to` casts
        (`TensorDict.to(dtype)` casts integer tensors too), so it neither casts nor passes the
        dtype on, and says so rather than leaving the tensors uncast.
        """
        dtype = self.request.dtype
        for value, where in walk(obj):
            if isinstance(value, torch.Tensor) and cast_dtype(value, dtype) not in (
                None,
                value.dtype,
            ):
                path = self.path(obj)
                inside = render(path, where)
                name = type(obj).__name__
                raise UnmovableError(
                    f"to_device({self.target}, dtype={dtype}): {path} ({name}) moves with its "
                    f"own .to(), which devicekit calls as .to({self.target}) and cannot ask to "
                    f"cast only floating-point and complex tensors, and it holds {inside} "
                    f"({describe_tensor(value)}), which dtype={dtype} would cast. Cast it "
                    "with its own method first, if that casts as you mean, or leave it out with "
                    "skip= and move it in a call of its own.",
                    path=inside,
                    obj=obj,
                )


#: Device types torch moves parameters to in place (`param.data = moved`, identity kept), from
#: any of them: where `torch._has_compatible_shallow_copy_type` holds. `meta` is not one.
_IN_PLACE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu"})


def _modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """`module` and its submodules, each once: `module.modules()` without the path strings."""
    found = [module]
    seen = {id(module)}
    for current in found:  # grows while read: breadth first
        for child in current._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


def move_module(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, non_blocking: bool
) -> Any:
    """`module.to(device, dtype)`, with tied parameters, shared buffers and views kept.

    torch keeps a parameter's identity only where it can swap the data in place (`param.data =
    moved`); to and from `meta`, or with `torch.__future__`'s overwrite or swap settings, each
    module gets a new `Parameter`, and one shared by two modules becomes two. A buffer is
    replaced by every move that changes it, so one registered under two names (or by two
    modules, or as a buffer and a parameter) becomes two on any device, and every moved tensor
    gets a storage of its own, so a buffer made from `param.data` (or a view of it) no longer
    shares the parameter's memory. Here every slot that held one tensor is pointed at one result
    afterwards (the first slot holding a `Parameter`, whose identity torch kept where it could,
    else the first slot), and tensors that shared a storage are made views of the moved copy of
    the one that covered all of it (without `dtype`: a cast changes the layout). A move that
    changes nothing (every tensor already on `device`, no `dtype`) costs one look at each.
    """
    future = torch.__future__
    untying = (
        device.type not in _IN_PLACE_TYPES
        or future.get_overwrite_module_params_on_conversion()
        or future.get_swap_module_params_on_conversion()
    )
    modules = _modules(module)
    if not untying and dtype is None and _all_on(modules, device):
        # Nothing is replaced: every tie and view stays as it is.
        return module.to(device=device, non_blocking=non_blocking)
    ties, views = _sharing(_tensor_slots(modules))
    moved = module.to(device=device, dtype=dtype, non_blocking=non_blocking)
    for group in ties:
        values = [entries.get(name) for entries, name in group]
        kept = next((v for v in values if isinstance(v, torch.nn.Parameter)), values[0])
        for (other, other_name), value in zip(group, values, strict=True):
            if value is not kept and other_name in other:
                other[other_name] = kept
    if dtype is None:
        for storage_group in views:
            _share_storage(storage_group)
    return moved


_Slots = list[tuple[dict[str, Any], str]]
#: A tensor's geometry before a move (offset, shape, stride, dtype), and the slots holding it.
_Placed = tuple[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], _Slots]


def _all_on(modules: list[torch.nn.Module], device: torch.device) -> bool:
    """Whether every parameter and buffer of `modules` is on `device` (a CPU, CUDA, MPS or
    XPU device, with its index where it has one)."""
    if device.type == "cpu":
        for submodule in modules:
            for entries in (submodule._parameters, submodule._buffers):
                for tensor in entries.values():
                    if tensor is not None and not tensor.is_cpu:
                        return False
        return True
    for submodule in modules:
        for entries in (submodule._parameters, submodule._buffers):
            for tensor in entries.values():
                if tensor is not None and tensor.device != device:
                    return False
    return True


def _tensor_slots(
    modules: list[torch.nn.Module],
) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Every parameter and buffer slot of `modules`: `(entries, name, tensor)`."""
    found = []
    for submodule in modules:
        for entries in (submodule._parameters, submodule._buffers):
            for name, tensor in entries.items():
                if tensor is not None:
                    found.append((entries, name, tensor))
    return found


def _sharing(
    slots: list[tuple[dict[str, Any], str, torch.Tensor]],
) -> tuple[list[_Slots], list[list[_Placed]]]:
    """The slots holding one tensor (ties), and the tensors sharing one storage (views): for
    each, its geometry before the move and its slots, the one covering the storage first."""
    by_id: dict[int, tuple[torch.Tensor, _Slots]] = {}
    for entries, name, tensor in slots:
        by_id.setdefault(id(tensor), (tensor, []))[1].append((entries, name))
    ties = [group for _, group in by_id.values() if len(group) > 1]
    # Storages and geometry as they are, past any torch function mode (a mode that simulates
    # devices would otherwise run for every call below).
    with torch._C.DisableTorchFunction():
        return ties, _views(by_id)


def _views(by_id: dict[int, tuple[torch.Tensor, _Slots]]) -> list[list[_Placed]]:
    by_storage: dict[int, list[tuple[torch.Tensor, _Slots]]] = {}
    for tensor, group in by_id.values():
        by_storage.setdefault(int(tensor.untyped_storage()._cdata), []).append((tensor, group))
    views: list[list[_Placed]] = []
    for shared in by_storage.values():
        if len(shared) < 2:
            continue
        covering = [i for i, (tensor, _) in enumerate(shared) if covers_storage(tensor)]
        if not covering:
            continue  # no moved tensor holds all of the storage: nothing to make views of
        shared.insert(0, shared.pop(covering[0]))
        views.append(
            [
                ((int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), t.dtype), group)
                for t, group in shared
            ]
        )
    return views


def covers_storage(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is all of its storage: contiguous, from offset 0, to its last byte."""
    return (
        tensor.storage_offset() == 0
        and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()
    )


def _share_storage(group: list[_Placed]) -> None:
    """Make the moved tensors of `group` views of the moved first one's storage again."""
    (_, base_slots), *others = group
    entries, name = base_slots[0]
    base = entries.get(name)
    if not isinstance(base, torch.Tensor):
        return
    storage = base.untyped_storage()
    for (offset, shape, stride, dtype), slots in others:
        entries, name = slots[0]
        current = entries.get(name)
        if not isinstance(current, torch.Tensor) or current.device != base.device:
            continue
        if current.untyped_storage()._cdata == storage._cdata:
            continue  # torch kept it (nothing moved)
        view = torch.empty(0, dtype=dtype, device=base.device)
        view.set_(storage, offset, shape, stride)
        if isinstance(current, torch.nn.Parameter):
            current.data = view  # every slot holds this very Parameter
        elif type(current) is torch.Tensor:
            view.requires_grad_(current.requires_grad)
            for other, other_name in slots:
                if other.get(other_name) is current:
                    other[other_name] = view


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
            does) to this floating-point or complex dtype; other tensors keep theirs. Objects
            with their own `.to()` are moved with `.to(device)` only: one holding tensors that
            `dtype` would cast raises `UnmovableError` rather than staying uncast.
        skip: Leave some values untouched: a predicate called with every value (`True` skips
            it, and everything inside it), or a collection of mapping keys (and dataclass field
            names) skipped at any depth.
        strict: `True` raises `UnmovableError` for an object devicekit cannot rebuild that
            holds tensors, instead of returning it as is.
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
            the `__cause__`.
        UnmovableError: A container could not be rebuilt from its moved contents; with
            `strict=True`, an object devicekit cannot rebuild holds tensors; or, with `dtype`,
            an object with its own `.to()` holds tensors that `dtype` would cast.
        InvalidArgumentError: `non_blocking`, `coalesce`, `dtype`, `skip` or `strict` has a
            value `to_device` does not take; the message names it, what was given and the fix.
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
    request = _request(target, non_blocking, dtype, coalesce)
    if skip is None and strict is False:
        kind = KIND_OF.get(type(obj))
        if kind in FLAT:  # the common batch: dicts, lists and tuples of tensors
            # One read of its contents, walked and rebuilt: another thread may change `obj`.
            batch: Any = obj
            batch = batch.copy() if kind == DICT else list(batch) if kind == LIST else batch
            values = batch.values() if kind == DICT else batch
            types = set(map(type, values))
            flat = types <= LEAF_TYPES  # one level: no walk at all
            if flat:
                leaves = batch if kind == LIST else list(values)
            else:
                try:
                    leaves = flatten_simple(batch)
                except NotSimple:
                    leaves = None
            if leaves is not None:
                plain = not flat or types <= _PLAIN
                moved_batch = _move_simple(batch, kind, leaves, request, flat=flat, plain=plain)
                return obj if moved_batch is batch else moved_batch
        elif kind in (NAMEDTUPLE, DATACLASS):
            try:
                leaves = flatten_simple(obj)
            except NotSimple:
                pass
            else:
                return _move_simple(obj, kind, leaves, request, flat=False, plain=True)
        elif kind == TENSOR:
            tensor: Any = obj
            plain = type(tensor) is torch.Tensor
            return _move_simple(obj, kind, [tensor], request, flat=False, plain=plain)
        predicate, keys = None, None
    else:
        if strict is not False and strict is not True:
            raise InvalidArgumentError(
                f"to_device({target}, strict={strict!r}): expected True or False, got "
                f"{_described(strict)}. Pass strict=True to be told about objects devicekit "
                "cannot rebuild that hold tensors."
            )
        predicate, keys = _skip_arguments(skip, target)
        if predicate is not None and skips(predicate, obj, _Mover(obj, request).unmovable):
            return obj
    kind = classify(type(obj))
    if kind <= OPAQUE:
        if strict and kind != ATOM:
            _Mover(obj, request).check_opaque(obj)
        return obj
    mover = _Mover(obj, request)
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
            unmovable=mover.unmovable,
        )
        leaves = found.leaves
    try:
        moved = move_leaves(leaves, request, plain=set(map(type, leaves)) <= _PLAIN)
    except TransferFailed as failure:
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
    request: TransferRequest,
    *,
    flat: bool,
    plain: bool,
) -> T:
    """`to_device` for a lone tensor, or a tree of plain containers that `flatten_simple`
    walked into `leaves`; `flat`: `obj` is a dict, list or tuple of nothing but tensors, and
    `leaves` are its values; `plain`: every leaf is exactly a `torch.Tensor`."""
    try:
        moved = move_leaves(leaves, request, plain=plain)
    except TransferFailed as failure:
        raise _Mover(obj, request).failed(failure) from failure.cause
    if moved is leaves:
        return obj
    if kind == TENSOR:
        return moved[0]  # type: ignore[return-value]
    if not flat:
        try:
            return rebuild_simple(obj, leaves, moved)  # type: ignore[no-any-return]
        except NotSimple:  # changed by another thread meanwhile, or close to the recursion limit
            mover = _Mover(obj, request)
            found = collect(
                obj, kind, skip=None, skip_keys=None, on_opaque=None, unmovable=mover.unmovable
            )
            by_id = dict(zip(map(id, leaves), moved, strict=True))
            new = [t for t in found.leaves if id(t) not in by_id]  # put in meanwhile
            if new:
                try:
                    by_id.update(zip(map(id, new), move_leaves(new, request, plain=False)))  # noqa: B905
                except TransferFailed as failure:
                    raise mover.failed(failure) from failure.cause
            in_order = [by_id[id(t)] for t in found.leaves]
            return rebuild(found, in_order, mover.call, mover.unmovable)  # type: ignore[no-any-return]
    if not any(map(is_not, moved, leaves)):  # all on `meta` already
        return obj
    return with_values(obj, kind, moved)  # type: ignore[no-any-return]
