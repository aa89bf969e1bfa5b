"""The invariants of `to_device`, as hypothesis properties over random nested batches.

Batches mix every container `to_device` rebuilds with tensors drawn from a small pool, so that
the same tensor appears twice and views of one storage appear together.
"""

from __future__ import annotations

import dataclasses
from collections import ChainMap, OrderedDict, defaultdict, deque
from typing import Any

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import devicekit
from devicekit.testing import Pair, Record, Snapshot, nested_batches

META = torch.device("meta")
KEYS = st.text("abc", min_size=1, max_size=2)


DTYPES = [torch.float32, torch.float64, torch.int64, torch.bool, torch.float16]


@st.composite
def base_tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    numel = 1
    for size in shape:
        numel *= size
    return torch.arange(numel).reshape(shape).to(dtype)


def _view(tensor: torch.Tensor, how: int) -> torch.Tensor:
    """One of a few kinds of views of `tensor` (the same storage, other offsets and strides)."""
    flat = tensor.view(-1)
    if how == 0:
        return flat[flat.numel() // 2 :]
    if how == 1:
        return flat[::2]
    if how == 2 and tensor.dim() >= 2:
        return tensor.transpose(0, 1)
    if how == 3:
        return tensor[0]
    return flat[:1]


@st.composite
def batches(
    draw: st.DrawFn, *, leaves: st.SearchStrategy[Any] | None = None, plain: bool = False
) -> Any:
    """Random batches; `plain`: only dicts, lists, tuples, namedtuples and dataclasses, with a
    container at the root (to_device's fast path)."""
    pool = draw(st.lists(base_tensors(), min_size=1, max_size=3))
    tensors = st.sampled_from(pool) | st.builds(_view, st.sampled_from(pool), st.integers(0, 4))
    atoms = st.none() | st.integers(-3, 3) | st.text("xyz", max_size=3)
    leaf = leaves if leaves is not None else (tensors | atoms)

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        if plain:
            return st.one_of(
                st.lists(children, max_size=4),
                st.lists(children, max_size=3).map(tuple),
                st.dictionaries(KEYS, children, max_size=4),
                st.builds(Pair, children, children),
                st.builds(Record, children, children),
                st.builds(Snapshot, children),
            )
        return st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(KEYS, children, max_size=4),
            st.dictionaries(KEYS, children, max_size=3).map(OrderedDict),
            st.dictionaries(KEYS, children, max_size=3).map(lambda d: defaultdict(list, d)),
            st.builds(Pair, children, children),
            st.builds(Record, children, children),
            st.builds(Snapshot, children),
            st.lists(children, max_size=3).map(lambda items: deque(items, maxlen=5)),
            st.lists(st.dictionaries(KEYS, children, max_size=2), min_size=1, max_size=3).map(
                lambda maps: ChainMap(*maps)
            ),
        )

    tree = st.recursive(leaf, containers, max_leaves=10)
    return draw(containers(tree) if plain else tree)


def signature(value: Any) -> Any:
    """Structure, types, keys and tensor metadata (not devices, not values)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", type(value), tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return (type(value), getattr(value, "default_factory", None)), [
            (key, signature(item)) for key, item in value.items()
        ]
    if isinstance(value, deque):
        return (deque, value.maxlen), [signature(item) for item in value]
    if isinstance(value, ChainMap):  # every map, shadowed ones included
        return ChainMap, [signature(item) for item in value.maps]
    if dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        return type(value), [signature(getattr(value, f.name)) for f in fields]
    if isinstance(value, list | tuple):
        return type(value), [signature(item) for item in value]
    return type(value), value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in walk order, repeats included."""
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, ChainMap):
            stack.extend(reversed(item.maps))
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(reversed([getattr(item, f.name) for f in dataclasses.fields(item)]))
        elif isinstance(item, list | tuple | deque):
            stack.extend(reversed(list(item)))
    return found


def snapshot(value: Any) -> Any:
    """What must not change: every container's children by identity, every tensor's device."""
    if isinstance(value, torch.Tensor):
        return id(value), value.device, value.dtype
    if isinstance(value, dict):
        return id(value), [(key, id(item), snapshot(item)) for key, item in value.items()]
    if isinstance(value, ChainMap):
        return id(value), [(id(item), snapshot(item)) for item in value.maps]
    if dataclasses.is_dataclass(value):
        items = [getattr(value, f.name) for f in dataclasses.fields(value)]
        return id(value), [(id(item), snapshot(item)) for item in items]
    if isinstance(value, list | tuple | deque):
        return id(value), [(id(item), snapshot(item)) for item in value]
    return id(value)


def _shares_storage(tensors: list[torch.Tensor]) -> set[int]:
    """Ids of tensors whose storage another distinct tensor of the list also uses."""
    by_storage: dict[int, set[int]] = {}
    for tensor in tensors:
        by_storage.setdefault(id(tensor.untyped_storage()), set()).add(id(tensor))
    return {tid for group in by_storage.values() if len(group) > 1 for tid in group}


@settings(max_examples=50)
@given(batches())
def test_round_trip_to_meta_keeps_structure_types_shapes_dtypes(batch: Any) -> None:
    moved = devicekit.to_device(batch, "meta")
    assert signature(moved) == signature(batch)
    before, after = tensors_in(batch), tensors_in(moved)
    assert all(t.device == META for t in after)
    shared = _shares_storage(before)
    for original, result in zip(before, after, strict=True):
        expected = original.stride() if id(original) in shared else original.to("meta").stride()
        assert result.stride() == expected


@settings(max_examples=50)
@given(batches())
def test_cpu_to_cpu_returns_the_very_same_objects(batch: Any) -> None:
    assert devicekit.to_device(batch, "cpu") is batch


@settings(max_examples=50)
@given(batches())
def test_values_survive_a_move(batch: Any) -> None:
    moved = devicekit.to_device(batch, "cpu", dtype=torch.float64)
    for original, result in zip(tensors_in(batch), tensors_in(moved), strict=True):
        if original.is_floating_point():
            assert result.dtype == torch.float64
            assert torch.equal(result, original.double())
        else:
            assert result is original


@settings(max_examples=50)
@given(batches())
def test_nothing_in_the_input_changes(batch: Any) -> None:
    before = snapshot(batch)
    devicekit.to_device(batch, "meta")
    devicekit.to_device(batch, "cpu", dtype=torch.float16)
    assert snapshot(batch) == before


@settings(max_examples=50)
@given(batches())
@example(torch.arange(4.0)[::2])  # a lone strided view: copied compactly, like Tensor.to
@example([torch.arange(4.0), torch.arange(4.0)[::2]])  # with its base: re-viewed
def test_aliasing_is_kept(batch: Any) -> None:
    moved = devicekit.to_device(batch, "meta")
    before, after = tensors_in(batch), tensors_in(moved)
    pairs = list(zip(before, after, strict=True))
    for a, moved_a in pairs:
        for b, moved_b in pairs:
            assert (a is b) == (moved_a is moved_b)
            same_storage = a.untyped_storage() is b.untyped_storage()
            assert same_storage == (moved_a.untyped_storage() is moved_b.untyped_storage())
            if same_storage and a is not b:
                assert moved_a.stride() == a.stride()
                shift = a.storage_offset() - b.storage_offset()
                assert moved_a.storage_offset() - moved_b.storage_offset() == shift
    distinct_in = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in before}
    distinct_out = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in after}
    assert sum(distinct_out.values()) <= sum(distinct_in.values())


def identities(value: Any) -> list[tuple[int, int]]:
    """Every container and tensor in walk order, each named by the index of its first
    appearance, with its storage named the same way: equal lists mean equal sharing."""
    objects: dict[int, int] = {}
    storages: dict[int, int] = {}
    found = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = storages.setdefault(id(item.untyped_storage()), len(storages))
            found.append((objects.setdefault(id(item), len(objects)), storage))
        elif isinstance(item, dict | list | tuple) or dataclasses.is_dataclass(item):
            found.append((objects.setdefault(id(item), len(objects)), -1))
            if isinstance(item, dict):
                stack.extend(reversed(list(item.values())))
            elif dataclasses.is_dataclass(item):
                stack.extend(reversed([getattr(item, f.name) for f in dataclasses.fields(item)]))
            else:
                stack.extend(reversed(item))
    return found


_SHARED = {"x": torch.ones(2)}


@settings(max_examples=100)
@given(batches(plain=True))
@example({"p": torch.nn.Parameter(torch.ones(2)), "t": [torch.zeros(1)]})  # a subclass inside
@example([_SHARED, {"again": _SHARED}])  # a container met twice
@example({"a": (), "b": ((), torch.ones(1))})  # so is the empty tuple, a singleton
@example([[[torch.ones(1)]] * 2, "x"])
def test_fast_path_agrees_with_the_general_path(batch: Any) -> None:
    """Plain containers take a recursive fast path (which hands subclasses and shared
    containers to the general one); a `skip` forces the general path."""
    before = snapshot(batch)
    fast = devicekit.to_device(batch, "meta")
    assert snapshot(batch) == before
    general = devicekit.to_device(batch, "meta", skip=lambda value: False)
    assert signature(fast) == signature(general)
    assert identities(fast) == identities(general)
    assert [t.stride() for t in tensors_in(fast)] == [t.stride() for t in tensors_in(general)]
    assert devicekit.to_device(fast, "meta") is fast
    assert devicekit.to_device(batch, "cpu") is batch
    cast = devicekit.to_device(batch, "cpu", dtype=torch.float64)
    cast_general = devicekit.to_device(batch, "cpu", dtype=torch.float64, skip=lambda v: False)
    assert identities(cast) == identities(cast_general)
    for ours, theirs in zip(tensors_in(cast), tensors_in(cast_general), strict=True):
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)


@settings(max_examples=50)
@given(batches())
def test_dtype_casts_floating_tensors_only(batch: Any) -> None:
    moved = devicekit.to_device(batch, "meta", dtype=torch.bfloat16)
    for original, result in zip(tensors_in(batch), tensors_in(moved), strict=True):
        expected = torch.bfloat16 if original.is_floating_point() else original.dtype
        assert result.dtype == expected


@settings(max_examples=50)
@given(batches(), KEYS)
def test_skipped_keys_are_left_alone_at_any_depth(batch: Any, key: str) -> None:
    moved = devicekit.to_device(batch, "meta", skip={key})
    stack = [(batch, moved)]
    while stack:
        original, result = stack.pop()
        if isinstance(original, dict):
            for name, item in original.items():
                if name == key:
                    assert result[name] is item
                else:
                    stack.append((item, result[name]))
        elif isinstance(original, list | tuple | deque):
            stack.extend(zip(original, result, strict=True))
        elif dataclasses.is_dataclass(original) and not isinstance(original, type):
            for field in dataclasses.fields(original):
                stack.append((getattr(original, field.name), getattr(result, field.name)))
        elif isinstance(original, torch.Tensor):
            assert result.is_meta


@settings(max_examples=30)
@given(batches())
def test_cycles_come_back_as_the_same_cycles(batch: Any) -> None:
    looped: list[Any] = [batch]
    looped.append(looped)
    mapping: dict[str, Any] = {"batch": batch}
    mapping["self"] = mapping
    moved = devicekit.to_device({"list": looped, "dict": mapping}, "meta")
    assert moved["list"][1] is moved["list"]
    assert moved["dict"]["self"] is moved["dict"]
    assert signature(moved["list"][0]) == signature(batch)
    assert all(t.is_meta for t in tensors_in(moved["list"][0]))


@settings(max_examples=10)
@given(st.integers(1, 3000), st.sampled_from(["dict", "list", "tuple", "box"]))
def test_any_depth_works(depth: int, kind: str) -> None:
    wrap = {
        "dict": lambda v: {"k": v},
        "list": lambda v: [v],
        "tuple": lambda v: (v, 1),
        "box": lambda v: Record(v),
    }[kind]
    nested: Any = torch.ones(1)
    for _ in range(depth):
        nested = wrap(nested)
    moved = devicekit.to_device(nested, "meta")
    [tensor] = tensors_in(moved)
    assert tensor.is_meta
    assert devicekit.find_device(moved) == META


@settings(max_examples=50)
@given(batches())
def test_devices_of_finds_every_tensor(batch: Any) -> None:
    found = devicekit.devices_of(batch)
    count = len(tensors_in(batch))
    assert sum(len(paths) for paths in found.values()) == count
    assert set(found) <= {torch.device("cpu")}
    assert devicekit.find_device(batch) == (torch.device("cpu") if count else None)


@settings(max_examples=40)
@given(nested_batches(cycles=False) | nested_batches(cycles=True, max_depth=2))
def test_users_nested_batches_move_whole(batch: Any) -> None:
    """The batches users draw from `devicekit.testing` move to `meta` leaving nothing behind."""
    moved = devicekit.to_device(batch, "meta")
    assert type(moved) is type(batch)
    assert set(devicekit.devices_of(moved)) <= {META}
    assert devicekit.find_device(moved) in (META, None)
    assert (devicekit.find_device(batch) is None) == (devicekit.find_device(moved) is None)
