"""`to_device`'s general walk: any structure, any depth, shared containers and cycles.

`to_device` works in three steps, and this module does the first and the last:

1. `collect` walks the structure depth-first with an explicit stack (so 100,000 levels of
   nesting work), takes one snapshot of every container it meets (`devicekit._containers`),
   records the containers in post-order, and gathers the tensors in the order it meets them.
2. `devicekit._move` transfers the tensors (this module never touches a tensor's data).
3. `rebuild` goes through the containers in post-order, so every child is rebuilt before its
   parent, and builds each from its snapshot; a container whose children did not change comes
   back as the very same object.

A cycle makes a container meet itself before it is rebuilt. A mutable container then gets an
early "shell", filled at its turn; an immutable one is built first (`_Rebuild.force`, iterative
too). Containers none of whose contents change, cycles included, come back as themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from operator import is_not
from typing import Any

import torch

from devicekit._containers import (
    CONTAINERS,
    DATACLASS,
    DICT,
    FIELDS,
    FIRST_CONTAINER,
    FLAT,
    GETTERS,
    KIND_OF,
    LEAF_TYPES,
    LIST,
    OPAQUE,
    REGISTERED,
    SIMPLE_TYPES,
    STRICT_SIMPLE_TYPES,
    TENSOR,
    TUPLE,
    classify,
    entry,
    keys_of,
    shellable,
    with_values,
)
from devicekit._errors import UnmovableError

__all__ = ["Collected", "Unmovable", "collect", "rebuild", "skips"]

#: How a walker reports a value it cannot handle: `unmovable(obj, problem, cause, fix=...)`
#: makes the error, with the value's path (the caller knows the root).
Unmovable = Callable[..., UnmovableError]

_KEYED = frozenset(kind.code for kind in CONTAINERS if kind.keyed)
_TAKEN_APART = "could not be taken apart"


class Collected:
    """What `collect` found: the containers in post-order and the tensors in walk order.

    Each container has a kind, a snapshot of its contents and slots. Slots are either
    `(start, stop)` into `leaves` when the container holds nothing but tensors (in order), or a
    list of `(key, child, where)` where `where` is the child's index in `leaves`, or `~number`
    (negative) for a container child, `number` being its index in `objs`.
    """

    __slots__ = ("calls", "index", "kinds", "leaves", "objs", "order", "slots", "snapshots")

    def __init__(self) -> None:
        self.leaves: list[torch.Tensor] = []
        self.objs: list[Any] = []
        self.kinds: list[int] = []
        self.slots: list[Any] = []
        self.snapshots: list[Any] = []
        self.order: list[int] = []
        self.index: dict[int, int] = {}
        self.calls = 0  # modules and .to() objects: phase 3 must run even if no tensor moved


def collect(
    root: Any,
    kind: int,
    *,
    skip: Callable[[Any], bool] | None,
    skip_keys: frozenset[Hashable] | None,
    on_opaque: Callable[[Any], None] | None,
    unmovable: Unmovable,
) -> Collected:
    """Walk `root` (a container, module or `.to()` object) depth-first, without recursion.

    This is the hot loop of `to_device`: the common kinds are inlined, and a container holding
    only tensors and atoms is handled without looking at its values one by one in Python.

    Raises:
        UnmovableError: A container could not be taken apart, a type could not be inspected, or
            `skip` raised; made by `unmovable`, with the cause chained.
    """
    found = Collected()
    leaves, objs, kinds, slots_of, snapshots, index = (
        found.leaves,
        found.objs,
        found.kinds,
        found.slots,
        found.snapshots,
        found.index,
    )
    leaves_append, leaves_extend = leaves.append, leaves.extend
    objs_append, kinds_append = objs.append, kinds.append
    snapshots_append, slots_of_append = snapshots.append, slots_of.append
    order_append = found.order.append
    fast = skip is None and skip_keys is None
    simple = SIMPLE_TYPES if on_opaque is None else STRICT_SIMPLE_TYPES
    leaf_types = LEAF_TYPES
    known = KIND_OF

    def skipped(key: Any, child: Any, parent_kind: int) -> bool:
        if skip is not None and skips(skip, child, unmovable):
            return True
        try:
            return skip_keys is not None and parent_kind in _KEYED and key in skip_keys
        except Exception as error:  # a key whose __eq__ raises
            raise unmovable(
                child,
                "is under a key that cannot be compared with the keys in skip=",
                error,
                fix="Give the key a __eq__ that returns False for other types, or skip with a "
                "predicate instead.",
            ) from error

    stack: list[tuple[int, Iterator[tuple[Any, Any]], list[Any]]] = []
    obj: Any = root
    snapshot: Any
    while True:
        # Register `obj`, a container (or module or .to() object) met for the first time.
        number = len(objs)
        index[id(obj)] = number
        objs_append(obj)
        kinds_append(kind)
        items: Iterator[tuple[Any, Any]] | None = None
        slots: list[Any] = []
        # One read of a container's contents: later changes by another thread do not mix in.
        if kind == DICT and len(obj) < 4:  # the most common small container
            snapshot = obj.copy()
            snapshots_append(snapshot)
            slots_of_append(slots)
            items = iter(snapshot.items())
        elif kind == DICT or kind == LIST or kind == TUPLE:  # noqa: SIM109  (no tuple built)
            snapshot = obj.copy() if kind == DICT else list(obj) if kind == LIST else obj
            snapshots_append(snapshot)
            values = snapshot.values() if kind == DICT else snapshot
            types = None
            if fast and len(snapshot) > 3:
                # Decide for all values at once when they are all tensors or atoms.
                types = set(map(type, values))
                if not types <= simple:
                    for tp in types:
                        if tp not in known:
                            try:
                                classify(tp)
                            except UnmovableError as error:
                                child = next(v for v in values if type(v) is tp)
                                raise _uninspectable(child, error, unmovable) from error.__cause__
            if types is not None and types <= leaf_types:  # only tensors: a slice of `leaves`
                start = len(leaves)
                leaves_extend(values)
                slots_of_append((start, len(leaves)))
            elif types is not None and types <= simple:  # tensors and atoms: tensors get slots
                start = len(leaves)
                pairs = snapshot.items() if kind == DICT else enumerate(snapshot)
                slots = [(key, value) for key, value in pairs if type(value) in leaf_types]
                leaves_extend([value for _, value in slots])
                slots = [(key, value, start + i) for i, (key, value) in enumerate(slots)]
                slots_of_append(slots)
            else:
                slots_of_append(slots)
                items = iter(snapshot.items()) if kind == DICT else enumerate(snapshot)
        elif kind < FIRST_CONTAINER:  # module or .to() object: called in phase 3
            found.calls += 1
            snapshots_append(None)
            slots_of_append(None)
        elif kind == DATACLASS:
            tp = type(obj)
            try:
                snapshot = GETTERS[tp](obj)
            except Exception:
                snapshot = _take_apart(obj, kind, unmovable)
            snapshots_append(snapshot)
            slots_of_append(slots)
            items = zip(FIELDS[tp], snapshot)  # noqa: B905  (one value per field)
        else:
            snapshot = _take_apart(obj, kind, unmovable)
            snapshots_append(snapshot)
            slots_of_append(slots)
            items = iter(entry(kind).pairs(obj, snapshot))
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
                    if fast or not skipped(key, child, kinds[number]):
                        slots.append((key, child, len(leaves)))
                        leaves_append(child)
                    continue
                child_kind = known.get(tp)
                if child_kind is None:
                    try:
                        child_kind = classify(tp)
                    except UnmovableError as error:
                        raise _uninspectable(child, error, unmovable) from error.__cause__
                if not fast and skipped(key, child, kinds[number]):
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


def skips(skip: Callable[[Any], bool], obj: Any, unmovable: Unmovable) -> bool:
    """`skip(obj)`; what it raises becomes `UnmovableError` with `obj`'s path."""
    try:
        return bool(skip(obj))
    except Exception as error:
        raise unmovable(
            obj,
            "made the skip= predicate raise",
            error,
            fix="Make skip return True or False for every value it is called with.",
        ) from error


def _take_apart(obj: Any, kind: int, unmovable: Unmovable) -> Any:
    try:
        return entry(kind).snapshot(obj)
    except Exception as error:
        fix = None
        if kind == DATACLASS and isinstance(error, AttributeError):
            fix = (
                "Give every field a value: a field with init=False needs one set by the class "
                "(e.g. None, in __post_init__)."
            )
        elif kind == REGISTERED:
            name = type(obj).__name__
            fix = (
                f"Fix the function registered for {name}: fn(obj) must return (children, "
                "rebuild), children a mapping of names to values."
            )
        raise unmovable(obj, _TAKEN_APART, error, fix=fix) from error


def _uninspectable(obj: Any, error: UnmovableError, unmovable: Unmovable) -> UnmovableError:
    """`classify` failed on `obj`'s type (a metaclass whose `__getattr__` raises)."""
    name = type(obj).__name__
    return unmovable(
        obj,
        "is of a type whose attributes cannot be looked up",
        error.__cause__,
        fix=f"Make the __getattr__ of {name}'s metaclass raise AttributeError for names it "
        "does not define, or leave the value out with skip=.",
    )


_UNSET: Any = object()
#: Each container kind's `build`, by code: looked up once per rebuilt container.
_BUILD: dict[int, Callable[[Any, Any, Any], Any]] = {
    code: entry(code).build for code in range(FIRST_CONTAINER, REGISTERED + 1)
}


class _Rebuild:
    """Phase 3: rebuild containers bottom-up from moved leaves (see module docstring)."""

    def __init__(
        self,
        found: Collected,
        moved: list[Any],
        call: Callable[[Any, int], Any],
        unmovable: Unmovable,
    ) -> None:
        self.found = found
        self.objs, self.kinds, self.slots = found.objs, found.kinds, found.slots
        self.snapshots, self.leaves = found.snapshots, found.leaves
        self.moved = moved
        self.call = call
        self.unmovable = unmovable
        self.results: list[Any] = [_UNSET] * len(found.objs)
        self.shells: set[int] = set()  # shells made early for a cycle, to be filled
        self.forcing: set[int] = set()
        self.unchanged: set[int] | None = None  # worked out at the first cycle met

    def run(self) -> Any:
        """Finish every container in post-order."""
        results, shells, finish = self.results, self.shells, self.finish
        for number in self.found.order:
            if results[number] is _UNSET or number in shells:
                finish(number)
        return results[self.found.order[-1]]

    def finish(self, number: int) -> None:
        """Build container `number` from its snapshot (or fill its shell), or call a module."""
        results = self.results
        obj, kind, slots = self.objs[number], self.kinds[number], self.slots[number]
        if kind < FIRST_CONTAINER:
            results[number] = self.call(obj, kind)
            return
        snapshot = self.snapshots[number]
        moved = self.moved
        if type(slots) is tuple:  # nothing but tensors
            start, stop = slots
            values = moved[start:stop]
            leaves = self.leaves
            if moved is leaves or not any(map(is_not, values, leaves[start:stop])):
                changes = []
            elif number in self.shells:
                changes = list(zip(keys_of(snapshot, kind), values, strict=True))
            else:
                results[number] = with_values(snapshot, kind, values)
                return
        else:
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
        shells = self.shells
        if shells and number in shells:  # a mutable container in a cycle: fill its shell
            fill = entry(kind).fill
            assert fill is not None  # only mutable kinds get shells
            self._guarded(obj, fill, results[number], snapshot, changes)
            shells.discard(number)
        elif results[number] is not _UNSET:  # built meanwhile, through a cycle
            return
        elif not changes:
            results[number] = obj
        elif kind == DICT:  # the snapshot is a private copy: it becomes the result
            snapshot.update(changes)
            results[number] = snapshot
        else:
            try:
                results[number] = _BUILD[kind](obj, snapshot, changes)
            except UnmovableError:
                raise
            except Exception as error:
                raise self.unmovable(
                    obj, "could not be rebuilt from its moved contents", error
                ) from error

    def _guarded(self, obj: Any, how: Callable[..., Any], *args: Any) -> Any:
        """`how(*args)`, a step of rebuilding `obj`; what it raises becomes `UnmovableError`."""
        try:
            return how(*args)
        except UnmovableError:
            raise
        except Exception as error:
            raise self.unmovable(
                obj, "could not be rebuilt from its moved contents", error
            ) from error

    def child(self, child: Any, number: int) -> Any:
        """The result of a container child not finished yet: `child` is an ancestor (a cycle)."""
        if not self._holds_moved(number):  # else it changes: no need to look further
            if self.unchanged is None:
                self.unchanged = self._unchanged()
            if number in self.unchanged:
                self.results[number] = child
                return child
        kind = self.found.kinds[number]
        if kind >= FIRST_CONTAINER and shellable(kind):
            make_shell = entry(kind).shell
            assert make_shell is not None
            snapshot = self.found.snapshots[number]
            shell = self.results[number] = self._guarded(child, make_shell, child, snapshot)
            self.shells.add(number)
            return shell
        self.force(number)
        return self.results[number]

    def _holds_moved(self, number: int) -> bool:
        """Whether container `number` itself holds a tensor that moved."""
        slots, moved, leaves = self.slots[number], self.moved, self.leaves
        if moved is leaves or slots is None:
            return False
        if type(slots) is tuple:
            start, stop = slots
            return any(map(is_not, moved[start:stop], leaves[start:stop]))
        return any(where >= 0 and moved[where] is not child for _, child, where in slots)

    def force(self, number: int) -> None:
        """Finish an immutable container out of turn, and first the immutable containers it
        needs, depth-first with an explicit stack (a cycle may run through thousands)."""
        found, results, forcing = self.found, self.results, self.forcing
        unchanged = self.unchanged if self.unchanged is not None else set()
        forcing.add(number)
        stack = [(number, iter(_container_slots(found.slots[number])))]
        while stack:
            top, pending = stack[-1]
            for _, child, where in pending:
                needed = ~where
                if (
                    results[needed] is not _UNSET
                    or needed in unchanged
                    or (found.kinds[needed] >= FIRST_CONTAINER and shellable(found.kinds[needed]))
                ):
                    continue
                if needed in forcing:
                    raise self.unmovable(
                        child, "is part of a cycle made only of immutable containers", None
                    )
                forcing.add(needed)
                stack.append((needed, iter(_container_slots(found.slots[needed]))))
                break
            else:
                stack.pop()
                self.finish(top)
                forcing.discard(top)

    def _unchanged(self) -> set[int]:
        """The containers from which no moved tensor and no module or `.to()` object can be
        reached: they come back as themselves, cycles and all."""
        found, moved = self.found, self.moved
        count = len(found.objs)
        calls_kept = all(
            self.results[number] is found.objs[number]
            for number in range(count)
            if found.kinds[number] < FIRST_CONTAINER
        )
        if calls_kept and (moved is found.leaves or not any(map(is_not, moved, found.leaves))):
            return set(range(count))  # nothing moved at all: everything stays as it is
        parents: list[list[int]] = [[] for _ in range(count)]
        changed: list[int] = []
        nothing_moved = moved is found.leaves
        for number in range(count):
            slots = found.slots[number]
            if found.kinds[number] < FIRST_CONTAINER:
                if self.results[number] is not found.objs[number]:
                    changed.append(number)
            elif type(slots) is tuple:
                start, stop = slots
                if not nothing_moved and any(
                    map(is_not, moved[start:stop], found.leaves[start:stop])
                ):
                    changed.append(number)
            else:
                for _, child, where in slots:
                    if where < 0:
                        parents[~where].append(number)
                    elif moved[where] is not child:
                        changed.append(number)
        reached = set(changed)
        while changed:
            for parent in parents[changed.pop()]:
                if parent not in reached:
                    reached.add(parent)
                    changed.append(parent)
        return set(range(count)) - reached


def _container_slots(slots: Any) -> list[tuple[Any, Any, int]]:
    if type(slots) is not list:
        return []
    return [slot for slot in slots if slot[2] < 0]


def rebuild(
    found: Collected,
    moved: list[Any],
    call: Callable[[Any, int], Any],
    unmovable: Unmovable,
) -> Any:
    """Phase 3: the rebuilt root. `call(obj, kind)` moves a module or `.to()` object."""
    return _Rebuild(found, moved, call, unmovable).run()


assert FLAT == (DICT, LIST, TUPLE)  # `collect` inlines the snapshots of these three
