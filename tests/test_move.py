"""`to_device`, `devices_of`, `find_device`, `register_mover`: examples for every container and
every error; the invariants are hypothesis properties in `test_move_properties.py`."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from collections import OrderedDict, UserDict, defaultdict, deque, namedtuple
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
import torch

import devicekit
from devicekit import _containers, _move, _tree

META = torch.device("meta")
CPU = torch.device("cpu")


class Point(NamedTuple):
    x: torch.Tensor
    label: str


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    name: str = "b"


@dataclasses.dataclass(frozen=True)
class Frozen:
    inputs: torch.Tensor
    derived: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "derived", self.inputs * 2)


@dataclasses.dataclass(slots=True)
class Slotted:
    inputs: torch.Tensor


class Opaque:
    def __init__(self) -> None:
        self.cache = torch.ones(2)


class FrozenMapping(Mapping[str, Any]):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class StubbornMapping(FrozenMapping):
    def __init__(self, data: dict[str, Any], extra: int) -> None:
        super().__init__(data)


class InPlace:
    """Moves itself in place and returns None from .to(), like some third-party containers."""

    def __init__(self) -> None:
        self.tensor = torch.ones(2)

    def to(self, device: torch.device) -> None:
        self.tensor = self.tensor.to(device)


class Returning:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def to(self, device: torch.device) -> Returning:
        return Returning(self.tensor.to(device))


def on_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


# --- tensors -------------------------------------------------------------------------------------


def test_tensor_moves_and_keeps_values() -> None:
    tensor = torch.arange(6.0).reshape(2, 3)
    moved = devicekit.to_device(tensor, "meta")
    assert moved.device == META
    assert moved.shape == (2, 3)
    assert moved.dtype == torch.float32
    assert torch.equal(devicekit.to_device(tensor, "cpu", dtype=torch.float64), tensor.double())


def test_tensor_already_there_is_returned_as_is() -> None:
    tensor = torch.ones(2)
    assert devicekit.to_device(tensor, "cpu") is tensor
    assert devicekit.to_device(tensor, torch.device("cpu")) is tensor


def test_parameter_keeps_its_type() -> None:
    parameter = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    [moved_parameter] = devicekit.to_device([parameter], "meta")
    assert type(moved_parameter) is torch.nn.Parameter
    assert moved_parameter.requires_grad is False
    trainable = devicekit.to_device(torch.nn.Parameter(torch.ones(2)), "meta")
    assert type(trainable) is torch.nn.Parameter
    assert trainable.is_leaf
    assert trainable.requires_grad


def test_tensor_subclass_is_kept() -> None:
    class Tagged(torch.Tensor):
        pass

    tagged = torch.ones(2).as_subclass(Tagged)
    assert type(devicekit.to_device([tagged], "meta")[0]) is Tagged


def test_device_none_uses_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from devicekit import _context

    token = _context._ACTIVE.set(META)
    try:
        assert devicekit.to_device(torch.ones(1)).is_meta
    finally:
        _context._ACTIVE.reset(token)


# --- containers ----------------------------------------------------------------------------------


def test_every_container_is_rebuilt_with_its_type() -> None:
    tensor = torch.ones(2)
    factory = defaultdict(list, {"a": tensor})
    batch = {
        "dict": {"a": tensor},
        "ordered": OrderedDict([("b", tensor), ("a", 1)]),
        "default": factory,
        "list": [tensor, "text"],
        "tuple": (tensor, 3),
        "point": Point(tensor, "p"),
        "max": torch.arange(3.0).max(0),
        "deque": deque([tensor, 1], maxlen=4),
        "set": {tensor},
        "frozenset": frozenset({tensor}),
        "dataclass": Batch(tensor),
        "frozen": Frozen(tensor),
        "slotted": Slotted(tensor),
        "mapping": FrozenMapping({"a": tensor, "b": "text"}),
        "proxy": MappingProxyType({"a": tensor}),
    }
    moved = devicekit.to_device(batch, "meta")
    for key, value in batch.items():
        assert type(moved[key]) is type(value), key
    assert moved["dict"]["a"].is_meta
    assert list(moved["ordered"]) == ["b", "a"]
    assert moved["ordered"]["b"].is_meta
    assert moved["default"].default_factory is list
    assert moved["default"]["a"].is_meta
    assert moved["list"][1] == "text"
    assert moved["list"][0].is_meta
    assert moved["point"].label == "p"
    assert moved["point"].x.is_meta
    assert moved["max"].values.is_meta
    assert moved["max"].indices.is_meta
    assert moved["deque"].maxlen == 4
    assert moved["deque"][0].is_meta
    assert all(on_meta(v) for v in moved["set"])
    assert all(on_meta(v) for v in moved["frozenset"])
    assert moved["dataclass"].inputs.is_meta
    assert moved["dataclass"].name == "b"
    assert moved["frozen"].inputs.is_meta
    assert moved["frozen"].derived.is_meta
    assert moved["slotted"].inputs.is_meta
    assert moved["mapping"]["a"].is_meta
    assert moved["mapping"]["b"] == "text"
    assert moved["proxy"]["a"].is_meta


def test_other_values_are_returned_as_is() -> None:
    numpy = pytest.importorskip("numpy")
    array = numpy.ones(3)
    opaque = Opaque()
    batch = {
        "s": "text",
        "n": 3,
        "none": None,
        "array": array,
        "opaque": opaque,
        "t": torch.ones(1),
    }
    moved = devicekit.to_device(batch, "meta")
    assert moved["array"] is array
    assert moved["opaque"] is opaque
    assert moved["opaque"].cache.is_cpu
    assert moved["s"] == "text"
    assert moved["n"] == 3
    assert moved["none"] is None
    assert devicekit.to_device(opaque, "meta") is opaque


def test_unchanged_containers_are_the_same_objects() -> None:
    inner = {"a": torch.ones(1)}
    batch = {"inner": inner, "moves": torch.ones(1, device="meta"), "text": ["x"]}
    moved = devicekit.to_device(batch, "meta")
    assert moved is not batch
    assert moved["inner"] is not inner
    assert moved["text"] is batch["text"]


def test_module_moves_in_place_with_tied_weights() -> None:
    first = torch.nn.Linear(2, 2)
    second = torch.nn.Linear(2, 2)
    second.weight = first.weight
    model = torch.nn.Sequential(first, second)
    weight = model[0].weight
    result = devicekit.to_device(model, "cpu", dtype=torch.float64)
    assert result is model
    assert model[0].weight is weight
    assert weight.dtype == torch.float64
    assert model[1].weight is model[0].weight
    assert devicekit.to_device({"model": model}, "meta")["model"] is model
    assert model[0].weight.is_meta


def test_to_method_objects() -> None:
    in_place = InPlace()
    batch = {"in_place": in_place, "returning": Returning(torch.ones(1))}
    moved = devicekit.to_device(batch, "meta")
    assert moved["in_place"] is in_place
    assert in_place.tensor.is_meta
    assert type(moved["returning"]) is Returning
    assert moved["returning"].tensor.is_meta


def test_batch_encoding_and_tensordict() -> None:
    transformers = pytest.importorskip("transformers")
    tensordict = pytest.importorskip("tensordict")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(1, 3, dtype=torch.long)})
    moved = devicekit.to_device({"enc": encoding}, "meta")
    assert moved["enc"]["input_ids"].is_meta
    data = tensordict.TensorDict({"x": torch.ones(2, 3)}, batch_size=[2])
    assert devicekit.to_device(data, "meta")["x"].is_meta


def test_register_mover() -> None:
    class Cache:
        def __init__(self, keys: torch.Tensor, size: int) -> None:
            self.keys, self.size = keys, size

    class SubCache(Cache):
        pass

    calls: list[str] = []

    def take_apart(cache: Cache) -> tuple[dict[str, Any], Any]:
        calls.append(type(cache).__name__)
        return {"keys": cache.keys, "size": cache.size}, lambda moved: type(cache)(**moved)

    devicekit.register_mover(Cache, take_apart)
    try:
        moved = devicekit.to_device({"c": SubCache(torch.ones(2), 3)}, "meta")
        assert type(moved["c"]) is SubCache
        assert moved["c"].keys.is_meta
        assert moved["c"].size == 3
        assert devicekit.devices_of(Cache(torch.ones(1), 1)) == {CPU: ["batch.keys"]}
    finally:
        del _containers.MOVERS[Cache]
        _containers.reset_caches()
    assert calls[0] == "SubCache"


def test_register_mover_rejects_bad_arguments() -> None:
    with pytest.raises(devicekit.InvalidArgumentError) as caught:
        devicekit.register_mover("Cache", lambda c: ({}, c))  # type: ignore[arg-type]
    assert str(caught.value) == (
        "register_mover('Cache', ...): expected a class, got a str. "
        "Pass the type itself, e.g. register_mover(MyBatch, fn)."
    )
    with pytest.raises(devicekit.InvalidArgumentError, match=r"expected a function"):
        devicekit.register_mover(Opaque, 3)  # type: ignore[arg-type]


# --- aliasing, cycles, depth ---------------------------------------------------------------------


def test_same_tensor_twice_is_one_tensor() -> None:
    tensor = torch.ones(3)
    moved = devicekit.to_device({"a": tensor, "b": [tensor, (tensor,)]}, "meta")
    assert moved["a"] is moved["b"][0] is moved["b"][1][0]


def test_views_share_one_moved_storage() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    row, column = base[1], base[:, 2]
    moved_base, moved_row, moved_column = devicekit.to_device(
        [base, row, column], "cpu", dtype=torch.float64
    )
    storage = moved_base.untyped_storage()
    assert moved_row.untyped_storage() is storage
    assert moved_column.untyped_storage() is storage
    assert (moved_row.storage_offset(), moved_row.stride()) == (4, (1,))
    assert (moved_column.storage_offset(), moved_column.stride()) == (2, (4,))
    assert torch.equal(moved_column, column.double())
    moved_base[1, 2] = -1.0
    assert moved_row[2] == -1.0
    assert moved_column[1] == -1.0


def test_views_of_part_of_a_storage_move_only_that_part() -> None:
    big = torch.arange(1000.0)
    first, second = big[10:20], big[15:30]
    moved_first, moved_second = devicekit.to_device((first, second), "cpu", dtype=torch.float64)
    assert moved_first.untyped_storage() is moved_second.untyped_storage()
    assert moved_first.untyped_storage().nbytes() == 20 * 8
    assert moved_second.storage_offset() - moved_first.storage_offset() == 5
    assert torch.equal(moved_second, second.double())


def test_views_with_autograd_history_move_one_by_one() -> None:
    base = torch.ones(4, requires_grad=True)
    view = base[1:]
    moved_base, moved_view = devicekit.to_device([base, view], "meta")
    assert moved_view.requires_grad
    assert moved_view.grad_fn is not None
    assert moved_base.shape == (4,)
    assert moved_view.shape == (3,)


def test_cycles_are_preserved() -> None:
    tensor = torch.ones(1)
    looped: list[Any] = [tensor]
    looped.append(looped)
    mapping: dict[str, Any] = {"t": tensor}
    mapping["self"] = mapping
    holder: list[Any] = []
    through_tuple = (holder, tensor)
    holder.append(through_tuple)
    moved = devicekit.to_device({"list": looped, "dict": mapping, "tuple": through_tuple}, "meta")
    assert moved["list"][1] is moved["list"]
    assert moved["list"][0].is_meta
    assert moved["dict"]["self"] is moved["dict"]
    assert moved["dict"]["t"].is_meta
    assert moved["tuple"][0][0] is moved["tuple"]
    assert moved["tuple"][1].is_meta
    assert looped[1] is looped
    assert looped[0] is tensor


def test_tuple_root_of_a_cycle() -> None:
    holder: list[Any] = []
    root = (holder, torch.ones(1))
    holder.append(root)
    moved = devicekit.to_device(root, "meta")
    assert moved[0][0] is moved
    assert moved[1].is_meta


def test_deep_nesting_has_no_recursion_limit() -> None:
    nested: Any = torch.ones(1)
    for _ in range(100_000):
        nested = {"k": [nested]}
    moved = devicekit.to_device(nested, "meta")
    for _ in range(100_000):
        moved = moved["k"][0]
    assert moved.is_meta
    assert devicekit.find_device(nested) == CPU


def test_nesting_within_the_fast_paths_depth_is_walked_either_way() -> None:
    """Plain batches up to `SIMPLE_DEPTH` levels take the recursive path, deeper ones the
    iterative one; both give the same result."""
    for depth in (_tree.SIMPLE_DEPTH - 1, _tree.SIMPLE_DEPTH + 5):
        nested: Any = [torch.ones(1), "x"]
        for _ in range(depth):
            nested = {"k": (nested, 1)}
        moved = devicekit.to_device(nested, "meta")
        for _ in range(depth):
            assert moved["k"][1] == 1
            moved = moved["k"][0]
        assert moved[0].is_meta
        assert moved[1] == "x"


def test_called_close_to_the_recursion_limit() -> None:
    """However little of Python's recursion limit is left to it, `to_device` either gives the
    whole result or raises `RecursionError` before doing anything, as any Python call would:
    never a half-moved batch, never another error. Once there is room enough, more room never
    hurts, and fewer frames than the batch has levels are enough: the fast path's recursion gives
    way to the general walk, which needs none."""
    depth = 40  # 80 containers: within the fast path's depth
    nested: Any = torch.ones(1)
    for _ in range(depth):
        nested = {"k": [nested]}

    def move_with(headroom: int) -> Any:
        """`to_device(nested, "meta")`, called with `headroom` frames left before the limit."""

        def descend(left: int) -> Any:
            if left > headroom:
                return descend(left - 1)
            return devicekit.to_device(nested, "meta")

        return descend(sys.getrecursionlimit() - len(inspect.stack(0)))

    worked = []
    refused = []
    for headroom in range(1, 6 * depth):
        try:
            moved = move_with(headroom)
        except RecursionError:
            refused.append(headroom)
            continue
        for _ in range(depth):
            assert type(moved) is dict
            moved = moved["k"][0]
        assert moved.is_meta  # the whole batch moved, never part of it
        worked.append(headroom)
    assert worked == list(range(worked[0], 6 * depth))  # more room never hurts
    assert refused == list(range(1, worked[0]))
    assert worked[0] < 2 * depth  # fewer frames than levels: no recursion over the batch


# --- options -------------------------------------------------------------------------------------


def test_dtype_casts_floating_and_complex_only() -> None:
    batch = {
        "f": torch.ones(1),
        "c": torch.ones(1, dtype=torch.complex64),
        "i": torch.ones(1, dtype=torch.long),
        "b": torch.ones(1, dtype=torch.bool),
    }
    with pytest.warns(UserWarning, match="discards the imaginary part"):
        moved = devicekit.to_device(batch, "cpu", dtype=torch.float16)
    assert moved["f"].dtype == torch.float16
    assert moved["i"] is batch["i"]
    assert moved["b"] is batch["b"]
    assert moved["c"].dtype == torch.float16  # as Module.to(torch.float16) does, with its warning
    complex_moved = devicekit.to_device(batch, "cpu", dtype=torch.complex128)
    assert complex_moved["c"].dtype == torch.complex128
    assert complex_moved["f"].dtype == torch.complex128


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"dtype": torch.int64},
            "to_device(cpu, dtype=torch.int64): expected a floating-point or complex torch.dtype "
            "(only such tensors are cast, as Module.to does), got torch.int64. Pass e.g. "
            "dtype=torch.float16, and cast integer tensors yourself, e.g. "
            "batch['ids'].to(torch.int32).",
        ),
        (
            {"dtype": "float16"},
            "to_device(cpu, dtype='float16'): expected a floating-point or complex torch.dtype "
            "(only such tensors are cast, as Module.to does), got 'float16' (a str). Pass e.g. "
            "dtype=torch.float16, and cast integer tensors yourself, e.g. "
            "batch['ids'].to(torch.int32).",
        ),
        (
            {"non_blocking": "yes"},
            "to_device(cpu, non_blocking='yes'): expected 'auto', True or False, got 'yes' "
            "(a str). Pass non_blocking='auto' (the default) or a bool.",
        ),
        (
            {"non_blocking": 1},  # equal to True, and hashed alike: still refused
            "to_device(cpu, non_blocking=1): expected 'auto', True or False, got 1 (an int). "
            "Pass non_blocking='auto' (the default) or a bool.",
        ),
        (
            {"non_blocking": []},
            "to_device(cpu, non_blocking=[]): expected 'auto', True or False, got [] (a list). "
            "Pass non_blocking='auto' (the default) or a bool.",
        ),
        (
            {"coalesce": 0},
            "to_device(cpu, coalesce=0): expected 'auto', True or False, got 0 (an int). "
            "Pass coalesce='auto' (the default) or a bool.",
        ),
        (
            {"skip": 3},
            "to_device(cpu, skip=3): expected a predicate (a function of the value) or a "
            "collection of hashable mapping keys, got 3 (an int). Pass e.g. "
            "skip={'meta', 'text'} or skip=lambda value: isinstance(value, str).",
        ),
        (
            {"skip": [["nested"]]},
            "to_device(cpu, skip=[['nested']]): expected a predicate (a function of the value) "
            "or a collection of hashable mapping keys, got [['nested']] (a list). Pass e.g. "
            "skip={'meta', 'text'} or skip=lambda value: isinstance(value, str).",
        ),
        (
            {"strict": "yes"},
            "to_device(cpu, strict='yes'): expected True or False, got 'yes' (a str). Pass "
            "strict=True to be told about objects devicekit cannot rebuild that hold tensors.",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 20 else None,
)
def test_bad_arguments_are_invalid_argument_errors(options: dict[str, Any], message: str) -> None:
    for batch in (torch.ones(1), {"x": torch.ones(1)}, [Batch(torch.ones(1))]):
        for _ in range(2):  # the second call meets the checked arguments' cache
            with pytest.raises(devicekit.InvalidArgumentError) as caught:
                devicekit.to_device(batch, "cpu", **options)
            assert str(caught.value) == message
            assert isinstance(caught.value, ValueError)
    devicekit.to_device(torch.ones(1), "cpu", non_blocking=True, coalesce=False)  # cached
    with pytest.raises(devicekit.InvalidArgumentError):  # 1 == True, 0 == False: not the cache's
        devicekit.to_device(torch.ones(1), "cpu", non_blocking=1, coalesce=0)  # type: ignore[arg-type]


def test_skip_keys_at_any_depth() -> None:
    batch = {"x": torch.ones(1), "inner": [{"raw": torch.ones(1), "y": torch.ones(1)}]}
    moved = devicekit.to_device(batch, "meta", skip={"raw"})
    assert moved["x"].is_meta
    assert moved["inner"][0]["y"].is_meta
    assert moved["inner"][0]["raw"] is batch["inner"][0]["raw"]  # type: ignore[index]
    assert devicekit.to_device(batch, "meta", skip="x")["x"] is batch["x"]


def test_skip_predicate() -> None:
    keep = torch.ones(1)
    batch = {"a": keep, "b": torch.ones(1), "c": [keep]}
    moved = devicekit.to_device(batch, "meta", skip=lambda value: value is keep)
    assert moved["a"] is keep
    assert moved["c"][0] is keep
    assert moved["b"].is_meta
    assert devicekit.to_device(keep, "meta", skip=lambda value: True) is keep


def test_the_checked_arguments_are_one_request_reused() -> None:
    devicekit.to_device(torch.ones(1), "meta", non_blocking=False, dtype=torch.float16)
    request = _move._REQUESTS[(META, False, torch.float16, "auto")]
    assert (request.target, request.non_blocking, request.dtype, request.coalesce) == (
        META,
        False,
        torch.float16,
        "auto",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.dtype = None  # type: ignore[misc]
    devicekit.to_device({"x": torch.ones(1)}, "meta", non_blocking=False, dtype=torch.float16)
    assert _move._REQUESTS[(META, False, torch.float16, "auto")] is request


# --- errors --------------------------------------------------------------------------------------


def test_strict_names_the_path_inside() -> None:
    batch = {"meta": Opaque(), "x": torch.ones(1)}
    with pytest.raises(devicekit.UnmovableError) as caught:
        devicekit.to_device(batch, "meta", strict=True)
    message = str(caught.value)
    assert "to_device(meta, strict=True): batch['meta'] is of type Opaque" in message
    assert "(batch['meta'].cache: f32[2] @ cpu)" in message
    assert "register_mover(Opaque, fn)" in message
    assert "strict=False" in message
    assert caught.value.path == "batch['meta'].cache"
    with pytest.raises(devicekit.UnmovableError, match=r"batch is of type Opaque"):
        devicekit.to_device(Opaque(), "meta", strict=True)


def test_strict_accepts_objects_without_tensors() -> None:
    class Empty:
        def __init__(self) -> None:
            self.name = "x"

    empty = Empty()
    assert devicekit.to_device([empty], "meta", strict=True)[0] is empty


def test_mapping_that_cannot_be_rebuilt() -> None:
    batch = {"m": StubbornMapping({"a": torch.ones(1)}, 3)}
    with pytest.raises(devicekit.UnmovableError) as caught:
        devicekit.to_device(batch, "meta")
    assert "batch['m'] (of type StubbornMapping) could not be rebuilt" in str(caught.value)
    assert "register_mover(StubbornMapping, fn)" in str(caught.value)
    assert isinstance(caught.value.__cause__, TypeError)


def test_failing_tensor_move_names_path_bytes_and_target() -> None:
    batch = {"inputs": [torch.ones(1), torch.ones(2, 3, device="meta")]}
    with pytest.raises(devicekit.MoveError) as caught:
        devicekit.to_device(batch, "cpu")
    error = caught.value
    assert str(error).startswith(
        "to_device(cpu): moving batch['inputs'][1] (f32[2,3] @ meta, 24 bytes) to cpu failed with "
        "NotImplementedError: Cannot copy out of meta tensor; no data. Meta tensors hold no data"
    )
    assert (error.path, error.nbytes, error.device) == ("batch['inputs'][1]", 24, CPU)
    assert isinstance(error.__cause__, NotImplementedError)


def test_failing_dispatch_names_the_tensor_in_a_flat_batch() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        quantized = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    with pytest.raises(devicekit.MoveError) as caught:
        devicekit.to_device({"a": torch.ones(1), "q": quantized}, "meta")
    assert str(caught.value) == (
        "to_device(meta): moving batch['q'] (quint8[2] @ cpu, 2 bytes) to meta failed with "
        "NotImplementedError: Could not run 'aten::empty_quantized' with arguments from the "
        "'QuantizedMeta' backend. torch has no quantized kernels for meta: dequantize it first "
        "(batch['q'].dequantize()), or leave it where it is with skip=. The original error is "
        "attached as __cause__."
    )
    assert (caught.value.path, caught.value.nbytes) == ("batch['q']", 2)
    cause = caught.value.__cause__
    assert isinstance(cause, NotImplementedError)
    assert "QuantizedMeta" in str(cause)
    assert len(str(cause)) > 1000  # the whole backend list, there


def test_long_causes_are_cut_to_whole_sentences() -> None:
    oom = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB "
        "of which 1.25 MiB is free. Including non-PyTorch memory, this process has 79.14 GiB "
        "memory in use. Of the allocated memory 78.00 GiB is allocated by PyTorch."
    )
    assert _move._cause(oom) == (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        "capacity of 79.15 GiB of which 1.25 MiB is free. Including non-PyTorch memory, this "
        "process has 79.14 GiB memory in use"
    )
    assert _move._cause(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 197 + "..."
    assert _move._cause(RuntimeError("short. Two sentences.")) == (
        "RuntimeError: short. Two sentences"
    )
    assert _move._cause(ValueError()) == "ValueError"


def test_failing_to_call_is_a_move_error() -> None:
    class Broken:
        def to(self, device: torch.device) -> None:
            raise RuntimeError("no room")

    with pytest.raises(devicekit.MoveError) as caught:
        devicekit.to_device({"b": [Broken()]}, "meta")
    assert str(caught.value).startswith(
        "to_device(meta): batch['b'][0] (Broken).to(meta) failed with RuntimeError: no room."
    )
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_failing_module_names_its_bytes() -> None:
    model = torch.nn.Linear(2, 3, device="meta")
    with pytest.raises(devicekit.MoveError) as caught:
        devicekit.to_device(model, "cpu")
    assert str(caught.value).startswith("to_device(cpu): model (Linear, 36 bytes).to(cpu) failed")
    assert caught.value.nbytes == 36


def test_invalid_device() -> None:
    with pytest.raises(devicekit.InvalidDeviceSpecError, match=r"to_device\('cuda:x'\)"):
        devicekit.to_device(torch.ones(1), "cuda:x")


# --- devices_of / find_device --------------------------------------------------------------------


def test_devices_of_lists_paths_per_device() -> None:
    model = torch.nn.Linear(1, 1)
    batch = {"x": torch.ones(1), "y": [torch.ones(1, device="meta")], "p": Point(torch.ones(1), "")}
    assert devicekit.devices_of(batch) == {
        CPU: ["batch['x']", "batch['p'].x"],
        META: ["batch['y'][0]"],
    }
    assert devicekit.devices_of(model) == {CPU: ["model.weight", "model.bias"]}
    assert devicekit.devices_of(torch.ones(1)) == {CPU: ["batch"]}
    assert devicekit.devices_of(["text", 3]) == {}


def test_find_device() -> None:
    assert devicekit.find_device(torch.ones(1, device="meta")) == META
    assert devicekit.find_device({"a": [torch.ones(1)]}) == CPU
    assert devicekit.find_device({"a": "text"}) is None


def test_find_device_on_mixed_devices() -> None:
    batch = {f"c{i}": torch.ones(1) for i in range(5)}
    batch["m"] = torch.ones(1, device="meta")
    with pytest.raises(devicekit.MixedDevicesError) as caught:
        devicekit.find_device(batch)
    assert str(caught.value) == (
        "find_device(): the tensors are on 2 devices (cpu: batch['c0'], batch['c1'], batch['c2'] "
        "and 2 more; meta: batch['m']). Move them to one device first, e.g. "
        "devicekit.to_device(batch, device)."
    )
    assert caught.value.devices[META] == ["batch['m']"]


# --- on CUDA (the asynchrony policy is tested in test_transfer.py) -------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_is_safe() -> None:
    batch = {"x": torch.arange(1000.0).pin_memory(), "y": [torch.arange(10)]}
    on_gpu = devicekit.to_device(batch, "cuda:0")
    assert on_gpu["x"].is_cuda
    assert on_gpu["y"][0].is_cuda
    back = devicekit.to_device(on_gpu, "cpu")
    assert torch.equal(back["x"], batch["x"])
    assert torch.equal(back["y"][0], batch["y"][0])


def test_user_dict_is_rebuilt() -> None:
    data = UserDict({"a": torch.ones(1)})
    moved = devicekit.to_device(data, "meta")
    assert type(moved) is UserDict
    assert moved["a"].is_meta
    assert data["a"].is_cpu


def test_namedtuple_factory_types() -> None:
    Pair = namedtuple("Pair", "a b")
    moved = devicekit.to_device(Pair(torch.ones(1), 2), "meta")
    assert type(moved) is Pair
    assert moved.a.is_meta
    assert moved.b == 2


@pytest.mark.parametrize(
    "batch",
    [{"a": torch.ones(2), "b": torch.ones(3)}, {"a": torch.ones(2), "n": [torch.ones(3), "x"]}],
    ids=["flat", "nested"],
)
def test_coalesce_reaches_the_transfer(batch: dict[str, Any]) -> None:
    packed = devicekit.to_device(batch, "meta", coalesce=True)
    alone = devicekit.to_device(batch, "meta", coalesce=False)
    tensors = [packed["a"], packed["b"] if "b" in packed else packed["n"][0]]
    assert tensors[0].untyped_storage() is tensors[1].untyped_storage()
    separate = [alone["a"], alone["b"] if "b" in alone else alone["n"][0]]
    assert separate[0].untyped_storage() is not separate[1].untyped_storage()


def test_storage_objects_are_kept_by_torch() -> None:
    """`devicekit._transfer` groups views by storage object: torch keeps one per storage."""
    import gc

    base = torch.arange(4.0)
    first = id(base.untyped_storage())
    gc.collect()
    assert id(base[1:].untyped_storage()) == first
    assert base.untyped_storage() is base[2:].untyped_storage()
