"""Where tensors are: `devices_of`, `find_device`, and the paths in error messages.

These walkers read the same table of container kinds as `to_device` (`devicekit._containers`),
look also into modules (parameters and buffers) and `.to()` objects (attributes), and never
recurse, so any depth works. A path such as `batch['inputs'][2]` is not built while walking:
each value gets a link `(parent link, step, key)` to its parent's, and a path is rendered only
when it is read, so walking a chain of 100,000 nodes costs time and memory in proportion to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import torch

from devicekit._containers import (
    ATOM,
    DATACLASS,
    FIELDS,
    FIRST_CONTAINER,
    KIND_OF,
    LEAF_TYPES,
    MODULE,
    OPAQUE,
    TENSOR,
    TO,
    attribute_step,
    classify,
    entry,
    item_step,
)
from devicekit._errors import MixedDevicesError

__all__ = ["Paths", "Where", "devices_in", "devices_of", "find_device", "path_of", "render", "walk"]

#: A path as a linked list: `(parent, step, key)`, `step(key)` being its last part; `None` for
#: the root.
Where = tuple[Any, Callable[[Any], str], Any] | None


def _name(key: Any) -> str:
    return str(key)


def render(root_name: str, where: Where) -> str:
    """The path `where` as text, starting with `root_name`: `batch['x'][0]`."""
    steps = []
    while where is not None:
        where, step, key = where
        steps.append(step(key))
    return root_name + "".join(reversed(steps))


def _labelled(
    obj: Any, kind: int, *, look_inside: bool
) -> tuple[Callable[[Any], str], Iterable[tuple[Any, Any]]]:
    """How the keys of `obj`'s children read in a path, and its `(key, child)` pairs.

    A container that cannot be taken apart has no children here: reporting never raises.
    """
    try:
        if kind >= FIRST_CONTAINER:
            found = entry(kind)
            try:
                snapshot = found.snapshot(obj)
            except Exception:
                if kind != DATACLASS:
                    raise
                names = FIELDS[type(obj)]  # a field never set: the others
                return attribute_step, [(n, getattr(obj, n)) for n in names if hasattr(obj, n)]
            return found.step, found.labelled(obj, snapshot)
        if kind == MODULE:
            return attribute_step, [*obj.named_parameters(), *obj.named_buffers()]
        if kind == TO and isinstance(obj, Mapping):
            return item_step, list(obj.items())
        if kind == TO or (kind == OPAQUE and look_inside):
            return attribute_step, _attributes(obj)
    except Exception:
        pass
    return attribute_step, []


def _attributes(obj: Any) -> list[tuple[str, Any]]:
    try:
        found = list(getattr(obj, "__dict__", {}).items())
    except Exception:  # no __dict__, and a __getattr__ that raises more than AttributeError
        found = []
    for cls in type(obj).__mro__:
        names = cls.__dict__.get("__slots__", ())
        for name in (names,) if isinstance(names, str) else names:
            if name in ("__dict__", "__weakref__"):
                continue
            try:
                found.append((name, getattr(obj, name)))
            except Exception:  # a slot never set, or a __getattr__ that raises
                continue
    return found


def _kind(tp: type) -> int:
    kind = KIND_OF.get(tp)
    if kind is None:
        try:
            kind = classify(tp)
        except Exception:  # a type that cannot be inspected: nothing to look into
            return OPAQUE
    return kind


def walk(
    root: Any, *, where: Where = None, look_inside: bool = False
) -> Iterator[tuple[Any, Where]]:
    """Every value reachable from `root`, depth-first in order, each with its path; no recursion.

    A container met again is yielded again but not walked twice (cycles end). With
    `look_inside`, the attributes of opaque objects are walked too.
    """
    seen: dict[int, Any] = {}  # kept alive: a registered mover's children are new objects
    stack: list[tuple[Any, Where]] = [(root, where)]
    while stack:
        obj, at = stack.pop()
        yield obj, at
        kind = _kind(type(obj))
        if kind in (TENSOR, ATOM) or (kind == OPAQUE and not look_inside):
            continue
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        step, pairs = _labelled(obj, kind, look_inside=look_inside)
        stack.extend((value, (at, step, key)) for key, value in reversed(list(pairs)))


def path_of(root: Any, target: Any) -> Where:
    """The path of the first occurrence of `target` (by identity) in `root`."""
    for value, where in walk(root):
        if value is target:
            return where
    return None


class _Steps:
    """The paths a walk met, as a tree: node `i` is `keys[i]`, read with `steps[i]`, under node
    `parents[i]` (`-1` for a root, whose key is its name). Plain lists of integers and shared
    objects: a million nodes make no work for the garbage collector."""

    __slots__ = ("keys", "parents", "steps")

    def __init__(self) -> None:
        self.parents: list[int] = []
        self.steps: list[Callable[[Any], str]] = []
        self.keys: list[Any] = []

    def render(self, node: int) -> str:
        parts = []
        parents, steps, keys = self.parents, self.steps, self.keys
        while node >= 0:
            parts.append(steps[node](keys[node]))
            node = parents[node]
        return "".join(reversed(parts))


class Paths(Sequence[str]):
    """The paths of the tensors on one device, in walk order, each rendered when read.

    It compares equal to a list of the same strings, and prints as one.

    Example:
        >>> import torch, devicekit
        >>> paths = devicekit.devices_of({"x": torch.ones(1), "y": [torch.ones(1)]})[
        ...     torch.device("cpu")
        ... ]
        >>> paths[1], len(paths), paths == ["batch['x']", "batch['y'][0]"]
        ("batch['y'][0]", 2, True)
    """

    __slots__ = ("_nodes", "_steps")

    def __init__(self, steps: _Steps, nodes: list[int]) -> None:
        self._steps = steps
        self._nodes = nodes

    def __len__(self) -> int:
        return len(self._nodes)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self._steps.render(node) for node in self._nodes[index]]
        return self._steps.render(self._nodes[index])

    def __iter__(self) -> Iterator[str]:
        return map(self._steps.render, self._nodes)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


def devices_in(labelled: Iterable[tuple[str, object]]) -> dict[torch.device, Paths]:
    """Each device met in the labelled objects, with the paths of the tensors on it.

    Walks like `walk` (tensors in their order, each container once), inlined: this is
    `devices_of`'s, `find_device`'s and `colocate`'s one pass over everything. A container's
    children are gone through in order, with an explicit stack of the unfinished ones, so a
    tensor is recorded when met, as one node of the paths' tree.
    """
    tree = _Steps()
    parents, steps, keys = tree.parents, tree.steps, tree.keys
    found: dict[torch.device, list[int]] = {}
    seen: dict[int, Any] = {}  # kept alive: a registered mover's children are new objects
    leaf_types, known = LEAF_TYPES, KIND_OF
    stack: list[tuple[int, Callable[[Any], str], Iterator[tuple[Any, Any]]]] = []
    for label, root in labelled:
        # The root, as the one child of a node with no parent.
        stack.append((-1, _name, iter([(label, root)])))
        while stack:
            parent, step, pairs = stack[-1]
            for key, value in pairs:
                tp = type(value)
                kind = TENSOR if tp in leaf_types else known.get(tp)
                if kind is None:
                    kind = _kind(tp)
                if kind <= OPAQUE:
                    continue
                node = len(keys)
                parents.append(parent)
                steps.append(step)
                keys.append(key)
                if kind == TENSOR:
                    device = value.device
                    nodes = found.get(device)
                    if nodes is None:
                        nodes = found[device] = []
                    nodes.append(node)
                    continue
                if id(value) in seen:
                    continue
                seen[id(value)] = value
                child_step, children = _labelled(value, kind, look_inside=False)
                stack.append((node, child_step, iter(children)))
                break
            else:
                stack.pop()
    return {device: Paths(tree, nodes) for device, nodes in found.items()}


def _root_name(obj: Any) -> str:
    return "model" if isinstance(obj, torch.nn.Module) else "batch"


def devices_of(obj: Any) -> dict[torch.device, Sequence[str]]:
    """Where the tensors in `obj` are: each device mapped to the paths of the tensors on it.

    Looks through everything `to_device` moves, and into modules (parameters and buffers) and
    the attributes of `.to()` objects. Devices come in the order they are first met, paths in
    walk order. The paths are a `Sequence[str]` that renders each path when it is read (it
    compares equal to a list of the same strings), so the walk stays linear on deep structures.

    Example:
        >>> import torch, devicekit
        >>> devicekit.devices_of({"x": torch.ones(2), "y": [torch.zeros(1, device="meta")]})
        {device(type='cpu'): ["batch['x']"], device(type='meta'): ["batch['y'][0]"]}
    """
    return dict(devices_in([(_root_name(obj), obj)]))


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
    listed = "; ".join(f"{device}: {listing(paths)}" for device, paths in found.items())
    raise MixedDevicesError(
        f"find_device(): the tensors are on {len(found)} devices ({listed}). Move them to one "
        "device first, e.g. devicekit.to_device(batch, device).",
        devices=found,
    )


def listing(paths: Sequence[str], limit: int = 3) -> str:
    """The first `limit` paths, and how many more: `a, b, c and 2 more`."""
    shown = ", ".join(paths[:limit])
    more = len(paths) - limit
    return shown if more <= 0 else f"{shown} and {more} more"
