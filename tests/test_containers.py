"""The table of container kinds (`devicekit._containers`): every kind is taken apart and rebuilt
by its own entry, and what a container cannot survive becomes an `UnmovableError` with its path.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import pytest
import torch

import devicekit
from devicekit import _containers, _tree
from devicekit._describe import describe_tensor
from tests.test_move import FrozenMapping

META = torch.device("meta")
CPU = torch.device("cpu")


def t(*shape: int) -> torch.Tensor:
    return torch.ones(*shape) if shape else torch.ones(1)


class Point(NamedTuple):
    x: Any
    y: Any


@dataclasses.dataclass
class Box:
    inner: Any
    label: str = "box"


class Tags(list[Any]):
    pass


class Ordered(collections.OrderedDict[str, Any]):
    pass


class Frozen(frozenset[Any]):
    pass


# One sample of every kind in the table, each holding one CPU tensor and an atom.
SAMPLES: dict[str, Callable[[torch.Tensor], Any]] = {
    "dataclass": lambda x: Box(x),
    "dict": lambda x: {"x": x, "n": 1},
    "dict subclass": lambda x: Ordered(x=x, n=1),
    "ChainMap": lambda x: collections.ChainMap({"x": x}, {"x": "shadowed", "n": 1}),
    "mapping": lambda x: FrozenMapping({"x": x, "n": 1}),
    "list": lambda x: [x, 1],
    "list subclass": lambda x: Tags([x, 1]),
    "tuple": lambda x: (x, 1),
    "namedtuple": lambda x: Point(x, 1),
    "structseq": lambda x: torch.return_types.max([x, 1]),
    "tuple subclass": lambda x: type("Pairish", (tuple,), {})((x, 1)),
    "deque": lambda x: collections.deque([x, 1], maxlen=4),
    "set": lambda x: {x, 1},
    "frozenset": lambda x: Frozen({x, 1}),
}


def test_every_kind_in_the_table_has_a_sample() -> None:
    assert [kind.name for kind in _containers.CONTAINERS] == list(SAMPLES)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_kind_is_classified_moved_and_reported_by_its_entry(name: str) -> None:
    """What the table says of a kind is what every walker does with it: the general walk
    (skip= takes it), the fast path where it applies, and `devices_of`."""
    x = t(2)
    obj = SAMPLES[name](x)
    kind = _containers.classify(type(obj))
    assert _containers.entry(kind).name == name
    for moved in (devicekit.to_device(obj, "meta"), devicekit.to_device(obj, "meta", skip=())):
        assert type(moved) is type(obj)
        assert set(devicekit.devices_of(moved)) == {META}
    assert devicekit.to_device(obj, "cpu") is obj  # nothing moved: the very same object
    [paths] = devicekit.devices_of(obj).values()
    assert len(paths) == 1
    if name in ("set", "frozenset"):  # members have no index to read them back by
        assert paths == ["batch{0}"] or paths == ["batch{1}"]
    else:
        assert eval(paths[0], {}, {"batch": obj}) is x  # the path reads the tensor back


def test_paths_read_as_each_kind_writes_them() -> None:
    x = t()
    batch = {
        "box": Box(x),
        "point": Point(1, x),
        "chain": collections.ChainMap({}, {"k": x}),
        "set": {x},
        "deque": collections.deque([0, x]),
    }
    assert devicekit.devices_of(batch) == {
        CPU: [
            "batch['box'].inner",
            "batch['point'].y",
            "batch['chain'].maps[1]['k']",
            "batch['set']{0}",
            "batch['deque'][1]",
        ]
    }


def test_the_hot_loops_name_kinds_of_the_table() -> None:
    """The codes the walkers compare are the table's entries, not a parallel numbering."""
    for code, name in [
        (_tree.DICT, "dict"),
        (_tree.LIST, "list"),
        (_tree.TUPLE, "tuple"),
        (_tree.NAMEDTUPLE, "namedtuple"),
        (_tree.DATACLASS, "dataclass"),
    ]:
        assert _containers.entry(code).name == name
    assert tuple(_containers.entry(code).name for code in _tree.FLAT) == ("dict", "list", "tuple")


# --- ChainMap (issue 18, item 15) ----------------------------------------------------------------


def test_chain_map_keeps_its_shadowed_maps() -> None:
    front, back = {"x": t(1)}, {"x": t(2), "y": t(3)}
    moved = devicekit.to_device(collections.ChainMap(front, back), "meta")
    assert type(moved) is collections.ChainMap
    assert len(moved.maps) == 2
    assert moved["x"].shape == (1,)
    assert moved.maps[1]["x"].shape == (2,)  # shadowed, kept and moved
    assert moved.maps[1]["y"].is_meta
    assert front["x"].is_cpu  # nothing in the input changed


def test_chain_map_maps_already_in_place_are_kept() -> None:
    on_target = {"x": t(1).to("meta")}
    chain = collections.ChainMap({"y": t(2)}, on_target)
    moved = devicekit.to_device(chain, "meta")
    assert moved.maps[1] is on_target


# --- register_mover (issue 12) -------------------------------------------------------------------


class Opaque:
    pass


def test_register_mover_names_what_it_got_instead_of_a_function() -> None:
    with pytest.raises(devicekit.InvalidArgumentError) as caught:
        devicekit.register_mover(Opaque, 3)  # type: ignore[arg-type]
    assert str(caught.value) == (
        "register_mover(Opaque, 3): expected a function fn(obj) -> (children, rebuild), "
        "got an object of type int."
    )


# --- raw exceptions become UnmovableError with a path (issue 18, item 10) ------------------------


@dataclasses.dataclass
class Lazy:
    x: torch.Tensor
    cache: Any = dataclasses.field(init=False)


class ReadOnly(dict[str, Any]):
    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("read-only")


class Refusing(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):  # what pytest and copy look up
            raise AttributeError(name)
        raise RuntimeError("no attributes here")


class Strange(metaclass=Refusing):
    pass


class Unreadable(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        return t()

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[str]:
        raise ValueError("cannot iterate")


class Touchy:
    def __hash__(self) -> int:
        return hash("meta")

    def __eq__(self, other: object) -> bool:
        raise ValueError("cannot compare")


class ByNone:
    pass


class ByList:
    pass


class ByRaising:
    pass


def _raise_key_error(obj: Any) -> Any:
    raise KeyError("inside the mover")


def _raise_value_error(value: Any) -> bool:
    raise ValueError("inside skip")


@pytest.fixture
def registered() -> Iterator[None]:
    devicekit.register_mover(ByNone, lambda obj: None)  # type: ignore[arg-type,return-value]
    devicekit.register_mover(ByList, lambda obj: ([t()], lambda m: obj))  # type: ignore[arg-type,return-value]
    devicekit.register_mover(ByRaising, _raise_key_error)
    yield
    for cls in (ByNone, ByList, ByRaising):
        del _containers.MOVERS[cls]
    _containers.reset_caches()


CASES: list[tuple[str, Callable[[], Any], dict[str, Any], str, type[BaseException], str]] = [
    (
        "dataclass field never set",
        lambda: {"lazy": Lazy(t())},
        {},
        "batch['lazy']",
        AttributeError,
        "to_device(meta): batch['lazy'] (of type Lazy) could not be taken apart "
        "(AttributeError: its field 'cache' was never set). Give every field a value: a field "
        "with init=False needs one set by the class (e.g. None, in __post_init__).",
    ),
    (
        "dict subclass refusing __setitem__",
        lambda: [ReadOnly(x=t())],
        {},
        "batch[0]",
        TypeError,
        "to_device(meta): batch[0] (of type ReadOnly) could not be rebuilt from its moved "
        "contents (TypeError: read-only). Teach devicekit to rebuild it with "
        "devicekit.register_mover(ReadOnly, fn), or give it a .to(device) method.",
    ),
    (
        "metaclass whose __getattr__ raises",
        lambda: {"odd": Strange(), "x": t()},
        {},
        "batch['odd']",
        RuntimeError,
        "to_device(meta): batch['odd'] (of type Strange) is of a type whose attributes cannot "
        "be looked up (RuntimeError: no attributes here). Make the __getattr__ of Strange's "
        "metaclass raise AttributeError for names it does not define, or leave the value out "
        "with skip=.",
    ),
    (
        "Mapping whose iteration raises",
        lambda: {"m": Unreadable()},
        {},
        "batch['m']",
        ValueError,
        "to_device(meta): batch['m'] (of type Unreadable) could not be taken apart "
        "(ValueError: cannot iterate). Teach devicekit to rebuild it with "
        "devicekit.register_mover(Unreadable, fn), or give it a .to(device) method.",
    ),
    (
        "key whose __eq__ raises, with skip=",
        lambda: {Touchy(): t()},
        {"skip": {"meta"}},
        "batch[",
        ValueError,
        "is under a key that cannot be compared with the keys in skip= (ValueError: cannot "
        "compare). Give the key a __eq__ that returns False for other types, or skip with a "
        "predicate instead.",
    ),
    (
        "mover returning None",
        lambda: {"r": ByNone()},
        {},
        "batch['r']",
        TypeError,
        "to_device(meta): batch['r'] (of type ByNone) could not be taken apart (TypeError: its "
        "registered mover returned None; expected (children, rebuild): a mapping of names to "
        "values and a function building the object from them). Fix the function registered "
        "for ByNone: fn(obj) must return (children, rebuild), children a mapping of names to "
        "values.",
    ),
    (
        "mover returning a non-mapping",
        lambda: {"r": ByList()},
        {},
        "batch['r']",
        TypeError,
        "its registered mover returned ([tensor(",
    ),
    (
        "mover raising",
        lambda: {"r": ByRaising()},
        {},
        "batch['r']",
        KeyError,
        "to_device(meta): batch['r'] (of type ByRaising) could not be taken apart (KeyError: "
        "'inside the mover'). Fix the function registered for ByRaising: fn(obj) must return "
        "(children, rebuild), children a mapping of names to values.",
    ),
    (
        "skip predicate raising",
        lambda: {"x": t()},
        {"skip": _raise_value_error},
        "batch",
        ValueError,
        "to_device(meta): batch (of type dict) made the skip= predicate raise (ValueError: "
        "inside skip). Make skip return True or False for every value it is called with.",
    ),
]


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(
    ("make", "options", "path", "cause", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_what_a_container_cannot_survive_is_an_unmovable_error(
    make: Callable[[], Any],
    options: dict[str, Any],
    path: str,
    cause: type[BaseException],
    message: str,
) -> None:
    with pytest.raises(devicekit.UnmovableError) as caught:
        devicekit.to_device(make(), "meta", **options)
    error = caught.value
    assert error.path is not None
    assert error.path.startswith(path)
    assert isinstance(error.__cause__, cause)
    if message.startswith("to_device("):
        assert str(error) == message
    else:
        assert message in str(error)


def test_the_reporting_walkers_read_around_what_cannot_be_taken_apart() -> None:
    """`devices_of` reports what it can reach and never raises for a container it cannot read."""
    lazy = Lazy(t())
    assert devicekit.devices_of({"lazy": lazy, "m": Unreadable(), "odd": Strange()}) == {
        CPU: ["batch['lazy'].x"]
    }


# --- nested tensors in messages ------------------------------------------------------------------


def nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def test_a_nested_tensor_is_described() -> None:
    assert describe_tensor(nested()) == "f32[nested, 2 tensors] @ cpu"


def test_a_nested_tensor_that_cannot_move_is_named_in_the_move_error() -> None:
    with pytest.raises(devicekit.MoveError) as caught:
        devicekit.to_device({"n": nested()}, "meta")
    assert re.match(
        r"to_device\(meta\): moving batch\['n'\] \(f32\[nested, 2 tensors\] @ cpu, 20 bytes\) "
        r"to meta failed with NotImplementedError",
        str(caught.value),
    )
    assert caught.value.path == "batch['n']"


class Wrapped:
    """A registered type whose mover builds new containers at every call."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def test_containers_a_mover_makes_on_the_fly_are_all_walked() -> None:
    """Containers that exist only while walked are each walked (none mistaken for another
    that had the same `id` before it was freed)."""
    devicekit.register_mover(
        Wrapped, lambda w: ({"parts": [w.tensor]}, lambda m: Wrapped(*m["parts"]))
    )
    try:
        batch = [Wrapped(t()) for _ in range(200)]
        [paths] = devicekit.devices_of(batch).values()
        assert len(paths) == 200
        assert paths[199] == "batch[199].parts[0]"
        moved = devicekit.to_device(batch, "meta")
        assert all(w.tensor.is_meta for w in moved)
    finally:
        del _containers.MOVERS[Wrapped]
        _containers.reset_caches()
