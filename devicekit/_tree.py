"""Walking nested batches: which values are containers, how to rebuild them.

`to_device` works in three steps, and this module does the first and the last:

1. `collect` walks the structure depth-first with an explicit stack (so 100,000 levels of
   nesting work), records every container it will have to rebuild in post-order, and gathers the
   tensors in the order it meets them.
2. `devicekit._move` transfers the tensors (this module never touches a tensor's data).
3. `rebuild` goes through the containers in post-order, so every child is rebuilt before its
   parent; a container whose children did not change comes back as the very same object.

Types are classified once, by exact type, into a small integer "kind"; the per-leaf cost of the
walk is a type lookup, and for containers of nothing but tensors and atoms (the common batch),
not even that: one `set(map(type, values))` decides for the whole container.

Most batches are trees of plain containers (dicts, lists, tuples, namedtuples, dataclasses) a
few levels deep. For them, `flatten_simple` and `rebuild_simple` do steps 1 and 3 recursively,
without the bookkeeping that cycles, shared containers and unlimited depth need; they decline
(`NotSimple`) whatever they do not handle, and `collect` and `rebuild` take over.

Paths such as `batch['inputs'][2]` are never built while moving: `path_of` finds one by walking
again, only when an error needs it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from operator import attrgetter, is_not
from typing import Any

import torch

from devicekit._errors import UnmovableError

__all__ = [
    "Collected",
    "Mover",
    "NotSimple",
    "classify",
    "collect",
    "flatten_simple",
    "path_of",
    "rebuild",
    "rebuild_simple",
    "register_mover",
    "render",
    "walk",
]

#: A registered mover: takes an object apart into named children, and returns how to rebuild it.
Mover = Callable[[Any], tuple[Mapping[str, Any], Callable[[dict[str, Any]], Any]]]

# Kinds. Leaves and atoms first; kinds >= DICT are containers that are rebuilt.
ATOM = 0  # returned as is: numbers, strings, None, numpy arrays, devices, dtypes
OPAQUE = 1  # returned as is, but may hide tensors (checked under strict=True)
TENSOR = 2
MODULE = 3  # nn.Module: moved in place with Module.to
TO = 4  # any other object with a callable .to()
DICT = 5
DICT_SUBCLASS = 6  # OrderedDict, defaultdict, ...: copied with copy.copy, factory and order kept
LIST = 7
LIST_SUBCLASS = 8
DEQUE = 9
SET = 10
DATACLASS = 11
# Kinds from here on cannot be rebuilt before their children are (no empty "shell" to fill).
TUPLE = 12
NAMEDTUPLE = 13
STRUCTSEQ = 14  # torch.return_types
TUPLE_SUBCLASS = 15
FROZENSET = 16
MAPPING = 17
REGISTERED = 18

_FIRST_CONTAINER = DICT
_KEYED = frozenset({DICT, DICT_SUBCLASS, MAPPING, DATACLASS})
#: Kinds whose values are checked all at once (when there are enough), and rebuilt from a slice.
_FLAT = (DICT, LIST, TUPLE)
_FIRST_UNSHELLABLE = TUPLE

_PLAIN_ATOM_TYPES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    type(Ellipsis),
    range,
    slice,
    enum.Enum,
    torch.device,
    torch.dtype,
    torch.Size,
    torch.layout,
    torch.memory_format,
    type,
)

#: Exact type -> kind. Filled lazily; cleared by `register_mover`.
_KIND: dict[type, int] = {}
#: Exact types known to be tensors, and exact types that are leaves or atoms (for the fast path).
LEAF_TYPES: set[type] = set()
SIMPLE_TYPES: set[type] = set()  # tensors, atoms and opaque objects: nothing to descend into
STRICT_SIMPLE_TYPES: set[type] = set()  # tensors and atoms only (opaque objects need a check)
ATOM_TYPES: set[type] = set()  # atoms and opaque objects: returned as they are
#: Registered movers, by the type they were registered for (subclasses use their base's mover).
_MOVERS: dict[type, Mover] = {}
#: Dataclass field names, by exact type, and a getter of all their values at once.
_FIELDS: dict[type, tuple[str, ...]] = {}
_GETTERS: dict[type, Callable[[Any], Any]] = {}
#: Dataclasses whose state is their plain `__dict__` (copied without `copy.copy`), by type.
_PLAIN_STATE: dict[type, bool] = {}


#: Whether tensors, dicts, lists and tuples have their usual kinds (no mover registered for them).
_PLAIN_BUILTINS = True


def _reset_caches() -> None:
    _KIND.clear()
    LEAF_TYPES.clear()
    SIMPLE_TYPES.clear()
    STRICT_SIMPLE_TYPES.clear()
    ATOM_TYPES.clear()
    for tp in (torch.Tensor, torch.nn.Parameter):
        classify(tp)
    for common in (str, int, float, bool, type(None), bytes, dict, list, tuple):
        classify(common)
    global _PLAIN_BUILTINS
    _PLAIN_BUILTINS = (
        _KIND[torch.Tensor] == TENSOR
        and _KIND[dict] == DICT
        and _KIND[list] == LIST
        and _KIND[tuple] == TUPLE
    )


def register_mover(cls: type[Any], fn: Mover) -> None:
    """Teach `to_device` (and `devices_of`) how to take apart and rebuild a type of your own.

    `fn(obj)` returns the object's children as a mapping of names to values, and a function that
    builds a new object from the moved children (a `dict` with the same names). Children are moved
    like everything else: nested containers, aliasing and cycles included. Subclasses of `cls`
    use the same mover unless they have their own. Registering a type again replaces its mover.

    Args:
        cls: The type to handle.
        fn: Takes an instance apart: `fn(obj) -> (children, rebuild)`.

    Raises:
        UnmovableError: `cls` is not a class or `fn` is not callable.

    Example:
        >>> import torch, devicekit
        >>> class Pair:
        ...     def __init__(self, left, right):
        ...         self.left, self.right = left, right
        >>> devicekit.register_mover(
        ...     Pair, lambda p: ({"left": p.left, "right": p.right}, lambda m: Pair(**m))
        ... )
        >>> moved = devicekit.to_device(Pair(torch.ones(2), "label"), "meta")
        >>> moved.left.device, moved.right
        (device(type='meta'), 'label')
    """
    if not isinstance(cls, type):
        raise UnmovableError(
            f"register_mover({cls!r}, ...): expected a class, got a {type(cls).__name__}. "
            "Pass the type itself, e.g. register_mover(MyBatch, fn).",
            path=None,
            obj=cls,
        )
    if not callable(fn):
        raise UnmovableError(
            f"register_mover({cls.__name__}, {fn!r}): expected a function "
            "fn(obj) -> (children, rebuild), got a {type(fn).__name__}.",
            path=None,
            obj=fn,
        )
    _MOVERS[cls] = fn
    _reset_caches()


def _mover_for(tp: type) -> Mover | None:
    for base in tp.__mro__:
        mover = _MOVERS.get(base)
        if mover is not None:
            return mover
    return None


def _kind_of(tp: type) -> int:
    if _MOVERS and _mover_for(tp) is not None:
        return REGISTERED
    if issubclass(tp, torch.Tensor):
        return TENSOR
    if issubclass(tp, torch.nn.Module):
        return MODULE
    if issubclass(tp, _PLAIN_ATOM_TYPES) or tp.__module__ == "numpy":
        return ATOM
    if callable(getattr(tp, "to", None)):
        return TO
    if dataclasses.is_dataclass(tp):
        return DATACLASS
    if issubclass(tp, dict):
        return DICT if tp is dict else DICT_SUBCLASS
    if issubclass(tp, Mapping):
        return MAPPING
    if issubclass(tp, list):
        return LIST if tp is list else LIST_SUBCLASS
    if issubclass(tp, tuple):
        if tp is tuple:
            return TUPLE
        if hasattr(tp, "_fields") and hasattr(tp, "_make"):
            return NAMEDTUPLE
        if hasattr(tp, "n_fields"):
            return STRUCTSEQ
        return TUPLE_SUBCLASS
    if issubclass(tp, deque):
        return DEQUE
    if issubclass(tp, set):
        return SET
    if issubclass(tp, frozenset):
        return FROZENSET
    return OPAQUE


def classify(tp: type) -> int:
    """The kind of an exact type (cached)."""
    kind = _KIND.get(tp)
    if kind is None:
        kind = _kind_of(tp)
        if len(_KIND) > 4096:  # types made on the fly (namedtuple factories): stay bounded
            _reset_caches()
        _KIND[tp] = kind
        if kind == TENSOR:
            LEAF_TYPES.add(tp)
        if kind <= OPAQUE:
            ATOM_TYPES.add(tp)
        if kind <= TENSOR:
            SIMPLE_TYPES.add(tp)
            if kind != OPAQUE:
                STRICT_SIMPLE_TYPES.add(tp)
        if kind == DATACLASS:
            names = _FIELDS[tp] = tuple(field.name for field in dataclasses.fields(tp))
            getter = attrgetter(*names) if names else (lambda obj: ())
            _GETTERS[tp] = getter if len(names) != 1 else (lambda obj: (getter(obj),))
            _PLAIN_STATE[tp] = _has_plain_state(tp)
    return kind


def _has_plain_state(tp: type) -> bool:
    """Whether `copy.copy` of an instance amounts to copying its `__dict__`."""
    return (
        all("__slots__" not in vars(cls) for cls in tp.__mro__[:-1])
        and "__copy__" not in dir(tp)
        and "__setstate__" not in dir(tp)
        and getattr(tp, "__reduce_ex__", None) is object.__reduce_ex__
        and getattr(tp, "__reduce__", None) is object.__reduce__
        and getattr(tp, "__getstate__", None) is getattr(object, "__getstate__", None)
    )


def keys_of(obj: Any, kind: int) -> Any:
    """The keys `rebuild` patches for the values of a `_FLAT` container, in the same order."""
    return obj.keys() if kind == DICT else range(len(obj))


def with_values(obj: Any, kind: int, values: list[Any]) -> Any:
    """A `_FLAT` container like `obj` holding `values` instead (all of them, in order)."""
    if kind == DICT:
        # As many values as keys, by construction; `zip`'s `strict` keyword alone costs more
        # than building a small dict.
        return dict(zip(obj, values))  # noqa: B905
    if kind == LIST:
        return values
    return tuple(values)


_reset_caches()


def children(obj: Any, kind: int) -> Iterator[tuple[Any, Any]]:
    """`(key, child)` pairs of a container; the key is what `rebuild` patches."""
    if kind in (DICT, DICT_SUBCLASS):
        return iter(obj.items())
    if kind == DATACLASS:
        return zip(_FIELDS[type(obj)], _GETTERS[type(obj)](obj), strict=True)
    if kind in (SET, FROZENSET):
        return ((value, value) for value in obj)
    if kind == MAPPING:
        return iter(list(obj.items()))
    return enumerate(obj)


class Collected:
    """What `collect` found: the containers in post-order and the tensors in walk order.

    Each container has a kind and slots. Slots are either `(start, stop)` into `leaves` when
    the container holds nothing but tensors (in order), or a list of `(key, child, where)`
    where `where` is the child's index in `leaves`, or `~number` (negative) for a container
    child, `number` being its index in `objs`.
    """

    __slots__ = ("calls", "index", "kinds", "leaves", "objs", "order", "parts", "slots")

    def __init__(self) -> None:
        self.leaves: list[torch.Tensor] = []
        self.objs: list[Any] = []
        self.kinds: list[int] = []
        self.slots: list[Any] = []
        self.order: list[int] = []
        self.index: dict[int, int] = {}
        #: For registered types: what the mover returned, `(children, rebuild)`.
        self.parts: dict[int, tuple[Mapping[str, Any], Callable[[dict[str, Any]], Any]]] = {}
        self.calls = 0  # modules and .to() objects: phase 3 must run even if no tensor moved


def collect(
    root: Any,
    kind: int,
    *,
    skip: Callable[[Any], bool] | None,
    skip_keys: frozenset[Hashable] | None,
    on_opaque: Callable[[Any], None] | None,
) -> Collected:
    """Walk `root` (a container, module or `.to()` object) depth-first, without recursion.

    This is the hot loop of `to_device`: everything is inlined, and a container holding only
    tensors and atoms is handled without looking at its values one by one in Python.
    """
    found = Collected()
    leaves, objs, kinds, slots_of, index = (
        found.leaves,
        found.objs,
        found.kinds,
        found.slots,
        found.index,
    )
    leaves_append, leaves_extend = leaves.append, leaves.extend
    order_append = found.order.append
    fast = skip is None and skip_keys is None
    simple = SIMPLE_TYPES if on_opaque is None else STRICT_SIMPLE_TYPES
    leaf_types = LEAF_TYPES
    known = _KIND
    stack: list[tuple[int, Iterator[tuple[Any, Any]], list[Any]]] = []
    obj: Any = root
    while True:
        # Register `obj`, a container (or module or .to() object) met for the first time.
        number = len(objs)
        index[id(obj)] = number
        objs.append(obj)
        kinds.append(kind)
        items: Iterator[tuple[Any, Any]] | None = None
        slots: list[Any] = []
        if kind == DICT and len(obj) < 4:  # the most common small container
            slots_of.append(slots)
            items = iter(obj.items())
        elif fast and kind in _FLAT and len(obj) > 3:
            # Decide for all values at once when they are all tensors or atoms.
            values = obj.values() if kind == DICT else obj
            types = set(map(type, values))
            if not types <= simple:
                for tp in types:
                    if tp not in known:
                        classify(tp)
            if types <= leaf_types:  # nothing but tensors: one slice of `leaves`
                start = len(leaves)
                leaves_extend(values)
                slots_of.append((start, len(leaves)))
            elif types <= simple:  # tensors and atoms: only the tensors get a slot
                start = len(leaves)
                pairs = obj.items() if kind == DICT else enumerate(obj)
                slots = [(key, value) for key, value in pairs if type(value) in leaf_types]
                leaves_extend([value for _, value in slots])
                slots = [(key, value, start + i) for i, (key, value) in enumerate(slots)]
                slots_of.append(slots)
            else:
                slots_of.append(slots)
                items = iter(obj.items()) if kind == DICT else enumerate(obj)
        elif kind == DICT:
            slots_of.append(slots)
            items = iter(obj.items())
        elif kind < _FIRST_CONTAINER:  # module or .to() object: called in phase 3
            found.calls += 1
            slots_of.append(None)
        elif kind == REGISTERED:
            parts = found.parts[number] = _mover_for(type(obj))(obj)  # type: ignore[misc]
            slots_of.append(slots)
            items = iter(list(parts[0].items()))
        elif kind == DATACLASS:
            slots_of.append(slots)
            tp = type(obj)
            items = zip(_FIELDS[tp], _GETTERS[tp](obj), strict=True)
        else:
            slots_of.append(slots)
            items = children(obj, kind)
        if items is None:
            order_append(number)
            if not stack:
                return found
            number, items, slots = stack[-1]
        else:
            stack.append((number, items, slots))
        # Go on with the innermost unfinished container until a new container turns up.
        obj = None
        while True:
            for key, child in items:
                tp = type(child)
                if tp in leaf_types:
                    if fast or not (
                        (skip is not None and skip(child))
                        or (skip_keys is not None and kinds[number] in _KEYED and key in skip_keys)
                    ):
                        slots.append((key, child, len(leaves)))
                        leaves_append(child)
                    continue
                child_kind = known.get(tp)
                if child_kind is None:
                    child_kind = classify(tp)
                if not fast and (
                    (skip is not None and skip(child))
                    or (skip_keys is not None and kinds[number] in _KEYED and key in skip_keys)
                ):
                    continue
                if child_kind <= OPAQUE:
                    if child_kind == OPAQUE and on_opaque is not None:
                        on_opaque(child)
                elif child_kind == TENSOR:  # a tensor type classified just now
                    slots.append((key, child, len(leaves)))
                    leaves_append(child)
                else:
                    seen = index.get(id(child))
                    if seen is None:  # registered next, as number len(objs)
                        slots.append((key, child, ~len(objs)))
                        obj, kind = child, child_kind
                        break
                    slots.append((key, child, ~seen))
            else:
                stack.pop()
                order_append(number)
                if stack:
                    number, items, slots = stack[-1]
                    continue
                return found
            break


# ---------------------------------------------------------------------------------------------
# The fast path: trees of plain containers (dicts, lists, tuples, namedtuples and dataclasses
# whose state is their `__dict__`) holding plain tensors and atoms

_TENSOR = torch.Tensor
#: Deeper trees take the general, iterative path (recursion here stays far from Python's limit).
SIMPLE_DEPTH = 100


class NotSimple(Exception):
    """`flatten_simple` declines: the tree holds something only the general path handles."""


def flatten_simple(root: Any) -> list[torch.Tensor]:
    """The plain tensors in a tree of plain containers, in walk order.

    Plain containers are dicts, lists, tuples, namedtuples and dataclasses whose state is their
    `__dict__`. Recursion (one Python call per container) costs a fraction of the general
    walk's bookkeeping, which matters for deep, narrow batches. Anything else in the tree (a
    tensor subclass, another container type, a container met twice, which includes cycles, or
    more than `SIMPLE_DEPTH` levels) raises `NotSimple`, and `to_device` takes the general
    path. `rebuild_simple` walks the same tree in the same order.
    """
    if not _PLAIN_BUILTINS:
        raise NotSimple
    leaves: list[torch.Tensor] = []
    try:
        _flatten((root,), SIMPLE_DEPTH, leaves.append, set())
    except RecursionError:  # called close to Python's recursion limit: no recursion then
        raise NotSimple from None
    return leaves


def _flatten(
    values: Iterable[Any], depth: int, append: Callable[[Any], None], seen: set[int]
) -> None:
    # Plain functions, not closures: a closure calling itself is a reference cycle, which
    # would keep every call's tensors alive until the garbage collector runs.
    for value in values:
        tp = type(value)
        if tp is _TENSOR:
            append(value)
            continue
        if tp in ATOM_TYPES:
            continue
        if tp is dict:
            children = value.values()
        elif tp is list or tp is tuple:
            children = value
        else:
            kind = _KIND.get(tp)
            if kind is None:  # a type met for the first time
                kind = classify(tp)
                if kind <= OPAQUE:
                    continue
            if kind == NAMEDTUPLE:
                children = value
            elif kind == DATACLASS and _PLAIN_STATE[tp]:
                children = _GETTERS[tp](value)
            else:
                raise NotSimple
        key = id(value)
        if key in seen or not depth:
            raise NotSimple
        seen.add(key)
        _flatten(children, depth - 1, append, seen)


def rebuild_simple(root: Any, moved: list[torch.Tensor]) -> Any:
    """`root` rebuilt around `moved`, the tensors `flatten_simple` found, moved, in its order.

    A container none of whose values changed comes back as the very same object.
    """
    return _build_sequence((root,), iter(moved).__next__)[0]


def _build_dict(obj: dict[Any, Any], take: Callable[[], torch.Tensor]) -> dict[Any, Any]:
    new = {}
    changed = False
    result: Any
    for key, value in obj.items():
        tp = type(value)
        if tp is _TENSOR:
            result = take()
        elif tp is dict:
            result = _build_dict(value, take)
        elif tp is list or tp is tuple:
            result = _build_sequence(value, take)
        elif tp in ATOM_TYPES:
            new[key] = value
            continue
        else:
            result = _build_other(value, tp, take)
        new[key] = result
        if result is not value:
            changed = True
    return new if changed else obj


def _build_sequence(obj: Iterable[Any], take: Callable[[], torch.Tensor]) -> Any:
    """A list or tuple like `obj` (a list, or any other iterable: a tuple), or `obj` itself.

    Its loop is `_build_dict`'s over values instead of items: the two stay separate so that a
    dict is built in the same pass, without a second one over its keys.
    """
    new: list[Any] = []
    append = new.append
    changed = False
    result: Any
    for value in obj:
        tp = type(value)
        if tp is _TENSOR:
            result = take()
        elif tp is dict:
            result = _build_dict(value, take)
        elif tp is list or tp is tuple:
            result = _build_sequence(value, take)
        elif tp in ATOM_TYPES:
            append(value)
            continue
        else:
            result = _build_other(value, tp, take)
        append(result)
        if result is not value:
            changed = True
    if not changed:
        return obj
    return new if type(obj) is list else tuple(new)


def _build_other(obj: Any, tp: type, take: Callable[[], torch.Tensor]) -> Any:
    """A namedtuple or plain-state dataclass rebuilt (`flatten_simple` let only those by)."""
    if _KIND[tp] == NAMEDTUPLE:
        values = _build_sequence(obj, take)
        return obj if values is obj else tp._make(values)  # type: ignore[attr-defined]
    fields = _GETTERS[tp](obj)
    values = _build_sequence(fields, take)
    if values is fields:
        return obj
    new: Any = object.__new__(tp)
    state = new.__dict__
    state.update(obj.__dict__)
    state.update(zip(_FIELDS[tp], values))  # noqa: B905  (one value per field)
    return new


_UNSET: Any = object()


def _copy_of(obj: Any, kind: int) -> Any:
    if kind == DICT:
        return dict(obj)
    if kind == LIST:
        return list(obj)
    if kind == SET and type(obj) is set:
        return set(obj)
    if kind == DATACLASS and _PLAIN_STATE[type(obj)]:
        new = object.__new__(type(obj))
        new.__dict__.update(obj.__dict__)
        return new
    return copy.copy(obj)


def _patch(target: Any, kind: int, changes: list[tuple[Any, Any]]) -> None:
    if kind == DATACLASS:
        if _PLAIN_STATE[type(target)]:
            target.__dict__.update(changes)
        else:
            for name, value in changes:
                object.__setattr__(target, name, value)
    elif kind == SET:
        for old, value in changes:
            target.discard(old)
            target.add(value)
    else:
        for key, value in changes:
            target[key] = value


def _construct(obj: Any, kind: int, parts: Any, changes: list[tuple[Any, Any]]) -> Any:
    """Build an immutable container from its children with `changes` applied."""
    tp = type(obj)
    if kind == FROZENSET:
        by_id = {id(old): new for old, new in changes}
        return tp(by_id.get(id(value), value) for value in obj)
    if kind in (MAPPING, REGISTERED):
        values = dict(obj.items()) if kind == MAPPING else dict(parts[0])
        values.update(changes)
        return tp(values) if kind == MAPPING else parts[1](values)
    items = list(obj)
    for key, new in changes:
        items[key] = new
    if kind == TUPLE:
        return tuple(items)
    if kind == NAMEDTUPLE:
        return tp._make(items)
    return tp(items)  # structseq (torch.return_types), other tuple subclasses


class _Rebuild:
    """Phase 3: rebuild containers bottom-up from moved leaves (see module docstring)."""

    def __init__(
        self,
        found: Collected,
        moved: list[Any],
        call: Callable[[Any, int], Any],
        unmovable: Callable[[Any, str, BaseException | None], UnmovableError],
    ) -> None:
        self.found = found
        self.moved = moved
        self.call = call
        self.unmovable = unmovable
        self.results: list[Any] = [_UNSET] * len(found.objs)
        self.shells: set[int] = set()  # shells made early for a cycle, to be filled
        self.forcing: set[int] = set()

    def child(self, child: Any, number: int) -> Any:
        """The result of an unfinished container child."""
        # Not built yet: `child` is an ancestor (a cycle) or was met earlier through another path.
        kind = self.found.kinds[number]
        if _FIRST_CONTAINER <= kind < _FIRST_UNSHELLABLE:
            shell = self.results[number] = _copy_of(child, kind)
            self.shells.add(number)
            return shell
        if number in self.forcing:
            raise self.unmovable(
                child, "is part of a cycle made only of immutable containers", None
            )
        self.forcing.add(number)
        try:
            self.build(number)
        finally:
            self.forcing.discard(number)
        return self.results[number]

    def build(self, number: int) -> None:
        found = self.found
        obj, kind, slots = found.objs[number], found.kinds[number], found.slots[number]
        if kind < _FIRST_CONTAINER:
            self.results[number] = self.call(obj, kind)
            return
        moved, leaves = self.moved, found.leaves
        if type(slots) is tuple:  # nothing but tensors
            start, stop = slots
            if moved is leaves or not any(map(is_not, moved[start:stop], leaves[start:stop])):
                self.results[number] = obj
            elif number in self.shells:  # a mutable container in a cycle: fill its shell
                shell = self.results[number]
                _patch(shell, kind, list(zip(keys_of(obj, kind), moved[start:stop], strict=True)))
                self.shells.discard(number)
            else:
                self.results[number] = with_values(obj, kind, moved[start:stop])
            return
        changes = []
        results = self.results
        for key, child, where in slots:
            if where >= 0:
                new = moved[where]
            else:
                new = results[~where]
                if new is _UNSET:
                    new = self.child(child, ~where)
            if new is not child:
                changes.append((key, new))
        shelled = number in self.shells
        if not changes and not shelled:
            self.results[number] = obj
        elif shelled:
            _patch(self.results[number], kind, changes)
            self.shells.discard(number)
        elif kind == DICT:
            new = dict(obj)
            new.update(changes)
            self.results[number] = new
        elif kind == DATACLASS and _PLAIN_STATE[type(obj)]:
            new = object.__new__(type(obj))
            state = new.__dict__
            state.update(obj.__dict__)
            state.update(changes)
            self.results[number] = new
        elif kind in (TUPLE, NAMEDTUPLE):
            items = list(obj)
            for key, value in changes:
                items[key] = value
            self.results[number] = tuple(items) if kind == TUPLE else type(obj)._make(items)
        elif kind < _FIRST_UNSHELLABLE:
            target = self.results[number] if shelled else _copy_of(obj, kind)
            _patch(target, kind, changes)
            self.results[number] = target
            self.shells.discard(number)
        else:
            self.results[number] = self._immutable(obj, kind, number, changes)

    def _immutable(self, obj: Any, kind: int, number: int, changes: list[tuple[Any, Any]]) -> Any:
        try:
            return _construct(obj, kind, self.found.parts.get(number), changes)
        except UnmovableError:
            raise
        except Exception as error:
            raise self.unmovable(
                obj, "could not be rebuilt from its moved contents", error
            ) from error

    def run(self) -> Any:
        """Rebuild every container in post-order; the common cases are inlined here."""
        found, results, shells, moved = self.found, self.results, self.shells, self.moved
        objs, kinds, slots_of = found.objs, found.kinds, found.slots
        plain_state = _PLAIN_STATE
        for number in found.order:
            if results[number] is not _UNSET and number not in shells:
                continue
            slots = slots_of[number]
            if type(slots) is not list or shells:  # tuple slots, calls, cycles
                self.build(number)
                continue
            obj = objs[number]
            changes = []
            for key, child, where in slots:
                if where >= 0:
                    new = moved[where]
                else:
                    new = results[~where]
                    if new is _UNSET:
                        new = self.child(child, ~where)
                if new is not child:
                    changes.append((key, new))
            kind = kinds[number]
            if shells and number in shells:  # it turned out to be in a cycle: fill its shell
                _patch(results[number], kind, changes)
                shells.discard(number)
                continue
            if not changes:
                results[number] = obj
                continue
            if kind == DICT:
                rebuilt = dict(obj)
                rebuilt.update(changes)
                results[number] = rebuilt
            elif kind == DATACLASS and plain_state[type(obj)]:
                rebuilt = object.__new__(type(obj))
                state = rebuilt.__dict__
                state.update(obj.__dict__)
                state.update(changes)
                results[number] = rebuilt
            elif kind in (NAMEDTUPLE, TUPLE, LIST):
                items = list(obj)
                for key, value in changes:
                    items[key] = value
                if kind == NAMEDTUPLE:
                    results[number] = type(obj)._make(items)
                else:
                    results[number] = items if kind == LIST else tuple(items)
            else:
                self.build(number)
        return results[found.order[-1]]


def rebuild(
    found: Collected,
    moved: list[Any],
    call: Callable[[Any, int], Any],
    unmovable: Callable[[Any, str, BaseException | None], UnmovableError],
) -> Any:
    """Phase 3: the rebuilt root. `call(obj, kind)` moves a module or `.to()` object."""
    return _Rebuild(found, moved, call, unmovable).run()


# ---------------------------------------------------------------------------------------------
# Paths, computed only when needed (errors, devices_of)

#: A path as a linked list: (parent, step) or None for the root.
Where = tuple[Any, str] | None


def render(root_name: str, where: Where) -> str:
    steps = []
    while where is not None:
        where, step = where
        steps.append(step)
    return root_name + "".join(reversed(steps))


def _labelled(obj: Any, kind: int, look_inside: bool) -> list[tuple[str, Any]]:
    """Children of any object with the path step that reaches each."""
    if kind in (DICT, DICT_SUBCLASS, MAPPING):
        return [(f"[{key!r}]", value) for key, value in obj.items()]
    if kind == NAMEDTUPLE:
        return [(f".{name}", value) for name, value in zip(obj._fields, obj, strict=True)]
    if kind in (LIST, LIST_SUBCLASS, TUPLE, STRUCTSEQ, TUPLE_SUBCLASS, DEQUE):
        return [(f"[{i}]", value) for i, value in enumerate(obj)]
    if kind in (SET, FROZENSET):
        return [(f"{{{i}}}", value) for i, value in enumerate(obj)]
    if kind == DATACLASS:
        return [(f".{name}", getattr(obj, name)) for name in _FIELDS[type(obj)]]
    if kind == REGISTERED:
        parts, _ = _mover_for(type(obj))(obj)  # type: ignore[misc]
        return [(f".{name}", value) for name, value in parts.items()]
    if kind == MODULE:
        named = [*obj.named_parameters(), *obj.named_buffers()]
        return [(f".{name}", value) for name, value in named]
    if kind == TO and isinstance(obj, Mapping):
        return [(f"[{key!r}]", value) for key, value in obj.items()]
    if kind == TO or (kind == OPAQUE and look_inside):
        return _attributes(obj)
    return []


def _attributes(obj: Any) -> list[tuple[str, Any]]:
    found = [(f".{name}", value) for name, value in getattr(obj, "__dict__", {}).items()]
    for cls in type(obj).__mro__:
        names = cls.__dict__.get("__slots__", ())
        for name in (names,) if isinstance(names, str) else names:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                found.append((f".{name}", getattr(obj, name)))
    return found


def walk(
    root: Any, *, where: Where = None, look_inside: bool = False
) -> Iterator[tuple[Any, Where]]:
    """Every value reachable from `root`, depth-first in order, each with its path; no recursion.

    With `look_inside`, the attributes of opaque objects are walked too.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, Where]] = [(root, where)]
    while stack:
        obj, at = stack.pop()
        yield obj, at
        tp = type(obj)
        kind = _KIND.get(tp)
        if kind is None:
            kind = classify(tp)
        if kind in (TENSOR, ATOM) or (kind == OPAQUE and not look_inside):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        labelled = _labelled(obj, kind, look_inside)
        stack.extend((value, (at, step)) for step, value in reversed(labelled))


def path_of(root: Any, target: Any) -> Where:
    """The path of the first occurrence of `target` (by identity) in `root`."""
    for value, where in walk(root):
        if value is target:
            return where
    return None
