"""Walking nested batches: `to_device`'s fast path, and the walking API `devicekit._move` uses.

Where things live:

- `devicekit._containers`: the table of container kinds (how each is taken apart and rebuilt),
  the classification of types into kinds, and `register_mover`.
- `devicekit._walk`: the general walk (`collect`) and rebuild (`rebuild`): any depth, shared
  containers, cycles.
- `devicekit._paths`: the reporting walkers (`devices_of`, `find_device`, paths in messages).
- here: the fast path, for the common batch.

Most batches are trees of plain containers (dicts, lists, tuples, namedtuples, dataclasses) a
few levels deep. For them, `flatten_simple` and `rebuild_simple` walk recursively, without the
bookkeeping that cycles, shared containers and unlimited depth need: one Python call per
container. They decline (`NotSimple`) whatever they do not handle, and the general walk takes
over. The fast path is a way of walking the table's plain kinds, not a second table: what it
meets that is not a plain kind, it classifies with the table and leaves to the general walk.

`rebuild_simple` walks the tree again rather than keeping a snapshot of it (a snapshot per
container would cost more than the walk when nothing moves); it checks that it meets the very
tensors `flatten_simple` found, in the same order, and declines if not, so a batch changed by
another thread meanwhile is moved by the general walk, from snapshots, instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from devicekit import _containers
from devicekit._containers import (
    ATOM,
    ATOM_TYPES,
    DATACLASS,
    DICT,
    FIELDS,
    FLAT,
    GETTERS,
    KIND_OF,
    LEAF_TYPES,
    LIST,
    MODULE,
    NAMEDTUPLE,
    OPAQUE,
    PLAIN_STATE,
    TENSOR,
    TO,
    TUPLE,
    classify,
    keys_of,
    with_values,
)
from devicekit._paths import path_of, render, walk
from devicekit._walk import Collected, collect, rebuild, skips

__all__ = [
    "ATOM",
    "DATACLASS",
    "DICT",
    "FLAT",
    "KIND_OF",
    "LEAF_TYPES",
    "LIST",
    "MODULE",
    "NAMEDTUPLE",
    "OPAQUE",
    "SIMPLE_DEPTH",
    "TENSOR",
    "TO",
    "TUPLE",
    "Collected",
    "NotSimple",
    "classify",
    "collect",
    "flatten_simple",
    "keys_of",
    "path_of",
    "rebuild",
    "rebuild_simple",
    "render",
    "skips",
    "walk",
    "with_values",
]

_TENSOR = torch.Tensor
#: Deeper trees take the general, iterative path (recursion here stays far from Python's limit).
SIMPLE_DEPTH = 100


class NotSimple(Exception):
    """The fast path declines: the tree holds something only the general path handles, or it
    changed between `flatten_simple` and `rebuild_simple`."""


def flatten_simple(root: Any) -> list[torch.Tensor]:
    """The plain tensors in a tree of plain containers, in walk order.

    Plain containers are dicts, lists, tuples, namedtuples and dataclasses whose state is their
    `__dict__`. Recursion (one Python call per container) costs a fraction of the general
    walk's bookkeeping, which matters for deep, narrow batches. Anything else in the tree (a
    tensor subclass, another container type, a container met twice, which includes cycles, or
    more than `SIMPLE_DEPTH` levels), and anything that raises while looking (called close to
    Python's recursion limit, a dict changed by another thread, a dataclass field never set),
    raises `NotSimple`, and `to_device` takes the general path, which reports errors with their
    paths. `rebuild_simple` walks the same tree in the same order.
    """
    if not _containers.plain_builtins:
        raise NotSimple
    leaves: list[torch.Tensor] = []
    try:
        _flatten((root,), SIMPLE_DEPTH, leaves.append, set())
    except NotSimple:
        raise
    except Exception as error:
        raise NotSimple from error
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
            kind = KIND_OF.get(tp)
            if kind is None:  # a type met for the first time
                kind = classify(tp)
                if kind <= OPAQUE:
                    continue
            if kind == NAMEDTUPLE:
                children = value
            elif kind == DATACLASS and PLAIN_STATE[tp]:
                children = GETTERS[tp](value)
            else:
                raise NotSimple
        key = id(value)
        if key in seen or not depth:
            raise NotSimple
        seen.add(key)
        _flatten(children, depth - 1, append, seen)


def rebuild_simple(root: Any, leaves: list[torch.Tensor], moved: list[torch.Tensor]) -> Any:
    """`root` rebuilt around `moved`: `leaves`, the tensors `flatten_simple` found, moved.

    A container none of whose values changed comes back as the very same object.

    Raises:
        NotSimple: The tree no longer holds `leaves` in that order (another thread changed it),
            or rebuilding raised; the general path takes over.
    """
    try:
        return _build_sequence((root,), iter(zip(leaves, moved)).__next__)[0]  # noqa: B905
    except Exception as error:  # StopIteration, RuntimeError: changed meanwhile; RecursionError
        raise NotSimple from error


Take = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def _build_dict(obj: dict[Any, Any], take: Take) -> dict[Any, Any]:
    new = {}
    changed = False
    result: Any
    for key, value in obj.items():
        tp = type(value)
        if tp is _TENSOR:
            old, result = take()
            if old is not value:
                raise NotSimple
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


def _build_sequence(obj: Iterable[Any], take: Take) -> Any:
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
            old, result = take()
            if old is not value:
                raise NotSimple
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


def _build_other(obj: Any, tp: type, take: Take) -> Any:
    """A namedtuple or plain-state dataclass rebuilt (`flatten_simple` let only those by)."""
    if KIND_OF[tp] == NAMEDTUPLE:
        values = _build_sequence(obj, take)
        return obj if values is obj else tp._make(values)  # type: ignore[attr-defined]
    fields = GETTERS[tp](obj)
    values = _build_sequence(fields, take)
    if values is fields:
        return obj
    new: Any = object.__new__(tp)
    state = new.__dict__
    state.update(obj.__dict__)
    state.update(zip(FIELDS[tp], values))  # noqa: B905  (one value per field)
    return new
