"""The table of container kinds: one entry per kind, knowing how to take it apart and rebuild it.

Every walker reads this table: `to_device`'s general walk (`devicekit._walk`), its fast path
(`devicekit._tree`), and the reporting walkers (`devices_of`, `find_device`, `colocate`, error
paths: `devicekit._paths`). Adding a container type means adding one `Kind` to `CONTAINERS`.

Types are classified once, by exact type, into a small integer code: the leaf kinds first
(`ATOM`, `OPAQUE`, `TENSOR`, `MODULE`, `TO`), then one code per entry of `CONTAINERS`, in the order
the entries are tried. The hot loops compare codes; everything else reads the entry.

Taking apart is one *snapshot* of the container's contents, read once (`dict(obj)`,
`list(obj)`, a tuple of field values): the walk goes through the snapshot and the rebuild builds
from it, so a container changed by another thread meanwhile never pairs a value with the wrong
key. A snapshot of a `dict` or `list` is a private copy that becomes the rebuilt container.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import Any

import torch

from devicekit._errors import InvalidArgumentError, UnmovableError

__all__ = [
    "CONTAINERS",
    "Kind",
    "MoverFunction",
    "classify",
    "entry",
    "keys_of",
    "register_mover",
    "with_values",
]

#: A registered mover: takes an object apart into named children, and returns how to rebuild it.
MoverFunction = Callable[[Any], tuple[Mapping[str, Any], Callable[[dict[str, Any]], Any]]]
#: `(key, new value)` pairs applied to a snapshot when rebuilding.
Changes = list[tuple[Any, Any]]

# The leaf kinds: not containers, not rebuilt from parts.
ATOM = 0  # returned as is: numbers, strings, None, numpy arrays, devices, dtypes
OPAQUE = 1  # returned as is, but may hide tensors (checked under strict=True)
TENSOR = 2
MODULE = 3  # nn.Module: moved in place with Module.to
TO = 4  # any other object with a callable .to()
FIRST_CONTAINER = 5


def item_step(key: Any) -> str:
    return f"[{key!r}]"


def index_step(key: Any) -> str:
    return f"[{key}]"


def attribute_step(key: Any) -> str:
    return f".{key}"


def member_step(key: Any) -> str:
    return f"{{{key}}}"


def maps_step(key: Any) -> str:
    return f".maps[{key}]"


class Kind:
    """One kind of container.

    Attributes:
        name: What the kind is, for messages.
        matches: Whether an exact type is of this kind (entries are tried in table order).
        snapshot: `obj`'s contents, read once; the only read of `obj` a walk makes.
        pairs: `pairs(obj, snapshot)`: the `(key, child)` pairs of a snapshot; the key is what
            `build` replaces.
        build: `build(obj, snapshot, changes)`: a new container like `obj` with the snapshot's
            contents and `changes` applied.
        shell: For mutable kinds, `shell(obj, snapshot)`: a new container made before its
            children are rebuilt (for cycles), filled later by `fill(shell, snapshot, changes)`.
        step: How a key reads in a path (`['x']`, `[2]`, `.name`).
        labelled: `(key, child)` pairs for paths, when they differ from `pairs` (namedtuples
            name their fields).
        keyed: `to_device(skip={...})` keys apply to its keys.
    """

    __slots__ = (
        "build",
        "code",
        "fill",
        "keyed",
        "labelled",
        "matches",
        "name",
        "pairs",
        "shell",
        "snapshot",
        "step",
    )

    def __init__(
        self,
        name: str,
        *,
        matches: Callable[[type], bool],
        snapshot: Callable[[Any], Any],
        pairs: Callable[[Any, Any], Iterable[tuple[Any, Any]]],
        build: Callable[[Any, Any, Changes], Any],
        step: Callable[[Any], str],
        shell: Callable[[Any, Any], Any] | None = None,
        fill: Callable[[Any, Any, Changes], None] | None = None,
        labelled: Callable[[Any, Any], Iterable[tuple[Any, Any]]] | None = None,
        keyed: bool = False,
    ) -> None:
        self.code = -1  # set by its place in `CONTAINERS`
        self.name = name
        self.matches = matches
        self.snapshot = snapshot
        self.pairs = pairs
        self.build = build
        self.step = step
        self.shell = shell
        self.fill = fill
        self.labelled = labelled or pairs
        self.keyed = keyed

    def __repr__(self) -> str:
        return f"<container kind {self.code}: {self.name}>"


def _enumerated(obj: Any, snapshot: Iterable[Any]) -> Iterable[tuple[int, Any]]:
    return enumerate(snapshot)


def _patched(values: Iterable[Any], changes: Changes) -> list[Any]:
    items = list(values)
    for index, value in changes:
        items[index] = value
    return items


def _merged(items: Iterable[tuple[Any, Any]], changes: Changes) -> dict[Any, Any]:
    merged = dict(items)
    merged.update(changes)
    return merged


# --- dicts and mappings -------------------------------------------------------------------------


def _build_dict(obj: Any, snapshot: dict[Any, Any], changes: Changes) -> dict[Any, Any]:
    snapshot.update(changes)  # the snapshot is a private copy: it becomes the result
    return snapshot


def _fill_dict(shell: dict[Any, Any], snapshot: Any, changes: Changes) -> None:
    shell.update(changes)


def _emptied(obj: Any) -> Any:
    """A copy of a mutable container, emptied: its type and settings (a `defaultdict`'s factory,
    a `deque`'s `maxlen`, attributes) kept, to be filled from a snapshot."""
    new = copy.copy(obj)
    new.clear()
    return new


def _fill_dict_subclass(shell: Any, snapshot: list[tuple[Any, Any]], changes: Changes) -> None:
    for key, value in _merged(snapshot, changes).items():
        shell[key] = value


def _build_dict_subclass(obj: Any, snapshot: list[tuple[Any, Any]], changes: Changes) -> Any:
    new = _emptied(obj)
    _fill_dict_subclass(new, snapshot, changes)
    return new


def _build_mapping(obj: Any, snapshot: list[tuple[Any, Any]], changes: Changes) -> Any:
    return type(obj)(_merged(snapshot, changes))


def _build_chain_map(obj: Any, snapshot: list[Any], changes: Changes) -> Any:
    new = copy.copy(obj)
    new.maps = _patched(snapshot, changes)
    return new


def _fill_chain_map(shell: Any, snapshot: list[Any], changes: Changes) -> None:
    shell.maps = _patched(snapshot, changes)


# --- sequences and sets --------------------------------------------------------------------------


def _build_list(obj: Any, snapshot: list[Any], changes: Changes) -> list[Any]:
    for index, value in changes:  # the snapshot is a private copy: it becomes the result
        snapshot[index] = value
    return snapshot


def _fill_list(shell: list[Any], snapshot: Any, changes: Changes) -> None:
    _build_list(None, shell, changes)


def _build_refilled(obj: Any, snapshot: list[Any], changes: Changes) -> Any:
    new = _emptied(obj)
    _refill(new, snapshot, changes)
    return new


def _refill(shell: Any, snapshot: list[Any], changes: Changes) -> None:
    values = _patched(snapshot, changes)
    if isinstance(shell, list):
        shell[:] = values
    elif isinstance(shell, set):
        shell.update(values)
    else:
        shell.extend(values)


def _build_tuple(obj: Any, snapshot: tuple[Any, ...], changes: Changes) -> tuple[Any, ...]:
    return tuple(_patched(snapshot, changes))


def _build_namedtuple(obj: Any, snapshot: tuple[Any, ...], changes: Changes) -> Any:
    return type(obj)._make(_patched(snapshot, changes))


def _build_from_items(obj: Any, snapshot: Iterable[Any], changes: Changes) -> Any:
    """`torch.return_types`, other tuple subclasses, frozensets: `type(obj)(values)`."""
    return type(obj)(_patched(snapshot, changes))


def _is_namedtuple(tp: type) -> bool:
    return issubclass(tp, tuple) and hasattr(tp, "_fields") and hasattr(tp, "_make")


def _is_structseq(tp: type) -> bool:
    return issubclass(tp, tuple) and hasattr(tp, "n_fields")


# --- dataclasses ---------------------------------------------------------------------------------

#: Dataclass field names, by exact type, and a getter of all their values at once.
FIELDS: dict[type, tuple[str, ...]] = {}
GETTERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
#: Whether a dataclass's state is its plain `__dict__` (copied without `copy.copy`), by type.
PLAIN_STATE: dict[type, bool] = {}


def _learn_dataclass(tp: type) -> None:
    names = FIELDS[tp] = tuple(field.name for field in dataclasses.fields(tp))
    getter = attrgetter(*names) if names else (lambda obj: ())
    GETTERS[tp] = getter if len(names) != 1 else (lambda obj: (getter(obj),))
    PLAIN_STATE[tp] = _has_plain_state(tp)


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


def _dataclass_snapshot(obj: Any) -> tuple[Any, ...]:
    try:
        return GETTERS[type(obj)](obj)
    except AttributeError as error:
        missing = [name for name in FIELDS[type(obj)] if not hasattr(obj, name)]
        if not missing:
            raise
        raise AttributeError(f"its field {missing[0]!r} was never set") from error


def _dataclass_pairs(obj: Any, snapshot: tuple[Any, ...]) -> Iterable[tuple[Any, Any]]:
    return zip(FIELDS[type(obj)], snapshot)  # noqa: B905  (one value per field)


def _dataclass_shell(obj: Any, snapshot: tuple[Any, ...]) -> Any:
    tp = type(obj)
    if PLAIN_STATE[tp]:
        new = object.__new__(tp)
        new.__dict__.update(obj.__dict__)
        return new
    return copy.copy(obj)


def _fill_dataclass(shell: Any, snapshot: tuple[Any, ...], changes: Changes) -> None:
    tp = type(shell)
    if PLAIN_STATE[tp]:
        state = shell.__dict__
        state.update(zip(FIELDS[tp], snapshot))  # noqa: B905  (one value per field)
        state.update(changes)
        return
    for name, value in _merged(zip(FIELDS[tp], snapshot), changes).items():  # noqa: B905
        object.__setattr__(shell, name, value)


def _build_dataclass(obj: Any, snapshot: tuple[Any, ...], changes: Changes) -> Any:
    new = _dataclass_shell(obj, snapshot)
    _fill_dataclass(new, snapshot, changes)
    return new


# --- registered types --------------------------------------------------------------------------

#: Registered movers, by the type they were registered for (subclasses use their base's mover).
MOVERS: dict[type, MoverFunction] = {}


def mover_for(tp: type) -> MoverFunction | None:
    for base in tp.__mro__:
        mover = MOVERS.get(base)
        if mover is not None:
            return mover
    return None


def _registered_snapshot(obj: Any) -> tuple[dict[str, Any], Callable[[dict[str, Any]], Any]]:
    fn = mover_for(type(obj))
    assert fn is not None  # classified REGISTERED because it has one
    result = fn(obj)
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], Mapping)
        or not callable(result[1])
    ):
        raise TypeError(
            f"its registered mover returned {_short_repr(result)}; expected (children, rebuild): "
            "a mapping of names to values and a function building the object from them"
        )
    return dict(result[0]), result[1]


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _build_registered(obj: Any, snapshot: tuple[dict[str, Any], Any], changes: Changes) -> Any:
    children, rebuild = snapshot
    return rebuild(_merged(children.items(), changes))


# --- the table ---------------------------------------------------------------------------------

#: Every container kind, in the order types are tested against them. A type none matches is
#: `OPAQUE`. `code` is `FIRST_CONTAINER` + the place in this table.
CONTAINERS: tuple[Kind, ...] = (
    Kind(
        "dataclass",
        matches=dataclasses.is_dataclass,
        snapshot=_dataclass_snapshot,
        pairs=_dataclass_pairs,
        build=_build_dataclass,
        shell=_dataclass_shell,
        fill=_fill_dataclass,
        step=attribute_step,
        keyed=True,
    ),
    Kind(
        "dict",
        matches=lambda tp: tp is dict,
        snapshot=dict,
        pairs=lambda obj, snapshot: snapshot.items(),
        build=_build_dict,
        shell=lambda obj, snapshot: snapshot,
        fill=_fill_dict,
        step=item_step,
        keyed=True,
    ),
    Kind(  # OrderedDict, defaultdict, ...: type, factory and order kept
        "dict subclass",
        matches=lambda tp: issubclass(tp, dict),
        snapshot=lambda obj: list(obj.items()),
        pairs=lambda obj, snapshot: iter(snapshot),
        build=_build_dict_subclass,
        shell=lambda obj, snapshot: _emptied(obj),
        fill=_fill_dict_subclass,
        step=item_step,
        keyed=True,
    ),
    Kind(  # its maps, each moved as what it is, shadowed ones included
        "ChainMap",
        matches=lambda tp: issubclass(tp, collections.ChainMap),
        snapshot=lambda obj: list(obj.maps),
        pairs=_enumerated,
        build=_build_chain_map,
        shell=lambda obj, snapshot: copy.copy(obj),
        fill=_fill_chain_map,
        step=maps_step,
    ),
    Kind(  # any other Mapping that can be built from a dict
        "mapping",
        matches=lambda tp: issubclass(tp, Mapping),
        snapshot=lambda obj: list(obj.items()),
        pairs=lambda obj, snapshot: iter(snapshot),
        build=_build_mapping,
        step=item_step,
        keyed=True,
    ),
    Kind(
        "list",
        matches=lambda tp: tp is list,
        snapshot=list,
        pairs=_enumerated,
        build=_build_list,
        shell=lambda obj, snapshot: snapshot,
        fill=_fill_list,
        step=index_step,
    ),
    Kind(
        "list subclass",
        matches=lambda tp: issubclass(tp, list),
        snapshot=list,
        pairs=_enumerated,
        build=_build_refilled,
        shell=lambda obj, snapshot: copy.copy(obj),
        fill=_refill,
        step=index_step,
    ),
    Kind(
        "tuple",
        matches=lambda tp: tp is tuple,
        snapshot=lambda obj: obj,
        pairs=_enumerated,
        build=_build_tuple,
        step=index_step,
    ),
    Kind(
        "namedtuple",
        matches=_is_namedtuple,
        snapshot=lambda obj: obj,
        pairs=_enumerated,
        build=_build_namedtuple,
        step=attribute_step,
        labelled=lambda obj, snapshot: zip(obj._fields, snapshot),  # noqa: B905
    ),
    Kind(  # torch.return_types
        "structseq",
        matches=_is_structseq,
        snapshot=lambda obj: obj,
        pairs=_enumerated,
        build=_build_from_items,
        step=index_step,
    ),
    Kind(
        "tuple subclass",
        matches=lambda tp: issubclass(tp, tuple),
        snapshot=lambda obj: obj,
        pairs=_enumerated,
        build=_build_from_items,
        step=index_step,
    ),
    Kind(  # maxlen kept
        "deque",
        matches=lambda tp: issubclass(tp, collections.deque),
        snapshot=list,
        pairs=_enumerated,
        build=_build_refilled,
        shell=lambda obj, snapshot: _emptied(obj),
        fill=_refill,
        step=index_step,
    ),
    Kind(
        "set",
        matches=lambda tp: issubclass(tp, set),
        snapshot=list,
        pairs=_enumerated,
        build=_build_refilled,
        shell=lambda obj, snapshot: _emptied(obj),
        fill=_refill,
        step=member_step,
    ),
    Kind(
        "frozenset",
        matches=lambda tp: issubclass(tp, frozenset),
        snapshot=list,
        pairs=_enumerated,
        build=_build_from_items,
        step=member_step,
    ),
)
for _number, _kind in enumerate(CONTAINERS, FIRST_CONTAINER):
    _kind.code = _number
del _number, _kind

#: Kinds by code; the leaf kinds have no entry.
_BY_CODE: dict[int, Kind] = {kind.code: kind for kind in CONTAINERS}


def _code(name: str) -> int:
    return next(kind.code for kind in CONTAINERS if kind.name == name)


# The kinds the walkers' hot loops and fast path name.
DATACLASS, DICT, DICT_SUBCLASS = _code("dataclass"), _code("dict"), _code("dict subclass")
LIST, TUPLE, NAMEDTUPLE = _code("list"), _code("tuple"), _code("namedtuple")
#: Types registered with `register_mover`, whatever else they are: taken apart and rebuilt by the
#: user's function (tested before every other kind, leaves included).
REGISTERED = FIRST_CONTAINER + len(CONTAINERS)
_BY_CODE[REGISTERED] = Kind(
    "registered type",
    matches=lambda tp: mover_for(tp) is not None,
    snapshot=_registered_snapshot,
    pairs=lambda obj, snapshot: iter(snapshot[0].items()),
    build=_build_registered,
    step=attribute_step,
)
#: Kinds whose values are checked all at once (when there are enough), and rebuilt from a slice.
FLAT = (DICT, LIST, TUPLE)


def entry(code: int) -> Kind:
    """The table entry of a container kind."""
    return _BY_CODE[code]


def shellable(code: int) -> bool:
    """Whether a container of this kind can be made before its children are rebuilt."""
    return _BY_CODE[code].shell is not None


def keys_of(snapshot: Any, code: int) -> Any:
    """The keys of a `FLAT` container's snapshot, in order: what `with_values` fills."""
    return list(snapshot) if code == DICT else range(len(snapshot))


def with_values(snapshot: Any, code: int, values: list[Any]) -> Any:
    """A `FLAT` container like `snapshot` holding `values` instead (all of them, in order)."""
    if code == DICT:
        # As many values as keys, by construction; `zip`'s `strict` keyword alone costs more
        # than building a small dict.
        return dict(zip(snapshot, values))  # noqa: B905
    if code == LIST:
        return values
    return tuple(values)


# --- classification ------------------------------------------------------------------------------

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
KIND_OF: dict[type, int] = {}
#: Exact types known to be tensors (for the fast path).
LEAF_TYPES: set[type] = set()
SIMPLE_TYPES: set[type] = set()  # tensors, atoms and opaque objects: nothing to descend into
STRICT_SIMPLE_TYPES: set[type] = set()  # tensors and atoms only (opaque objects need a check)
ATOM_TYPES: set[type] = set()  # atoms and opaque objects: returned as they are
#: Whether tensors, dicts, lists and tuples have their usual kinds (no mover registered for them).
plain_builtins = True


def reset_caches() -> None:
    KIND_OF.clear()
    LEAF_TYPES.clear()
    SIMPLE_TYPES.clear()
    STRICT_SIMPLE_TYPES.clear()
    ATOM_TYPES.clear()
    for tp in (torch.Tensor, torch.nn.Parameter):
        classify(tp)
    for common in (str, int, float, bool, type(None), bytes, dict, list, tuple):
        classify(common)
    global plain_builtins
    plain_builtins = (
        KIND_OF[torch.Tensor] == TENSOR
        and KIND_OF[dict] == DICT
        and KIND_OF[list] == LIST
        and KIND_OF[tuple] == TUPLE
    )


def _kind_of(tp: type) -> int:
    if MOVERS and _BY_CODE[REGISTERED].matches(tp):
        return REGISTERED
    if issubclass(tp, torch.Tensor):
        return TENSOR
    if issubclass(tp, torch.nn.Module):
        return MODULE
    if issubclass(tp, _PLAIN_ATOM_TYPES) or tp.__module__ == "numpy":
        return ATOM
    if callable(getattr(tp, "to", None)):
        return TO
    for kind in CONTAINERS:
        if kind.matches(tp):
            return kind.code
    return OPAQUE


def classify(tp: type) -> int:
    """The kind of an exact type (cached).

    Raises:
        UnmovableError: The type cannot be inspected (a metaclass whose `__getattr__` raises);
            the caller that knows where the value sits re-raises it with its path.
    """
    kind = KIND_OF.get(tp)
    if kind is None:
        try:
            kind = _kind_of(tp)
        except Exception as error:
            raise UnmovableError(
                f"type {tp.__qualname__} cannot be inspected: looking up its attributes raised "
                f"{type(error).__name__}: {error}",
                path=None,
                obj=tp,
            ) from error
        if len(KIND_OF) > 4096:  # types made on the fly (namedtuple factories): stay bounded
            reset_caches()
        KIND_OF[tp] = kind
        if kind == TENSOR:
            LEAF_TYPES.add(tp)
        if kind <= OPAQUE:
            ATOM_TYPES.add(tp)
        if kind <= TENSOR:
            SIMPLE_TYPES.add(tp)
            if kind != OPAQUE:
                STRICT_SIMPLE_TYPES.add(tp)
        if kind == DATACLASS:
            _learn_dataclass(tp)
    return kind


def register_mover(cls: type[Any], fn: MoverFunction) -> None:
    """Teach `to_device` (and `devices_of`) how to take apart and rebuild a type of your own.

    `fn(obj)` returns the object's children as a mapping of names to values, and a function that
    builds a new object from the moved children (a `dict` with the same names). Children are moved
    like everything else: nested containers, aliasing and cycles included. Subclasses of `cls`
    use the same mover unless they have their own. Registering a type again replaces its mover.

    Args:
        cls: The type to handle.
        fn: Takes an instance apart: `fn(obj) -> (children, rebuild)`.

    Raises:
        InvalidArgumentError: `cls` is not a class or `fn` is not callable.

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
        raise InvalidArgumentError(
            f"register_mover({cls!r}, ...): expected a class, got a {type(cls).__name__}. "
            "Pass the type itself, e.g. register_mover(MyBatch, fn)."
        )
    if not callable(fn):
        raise InvalidArgumentError(
            f"register_mover({cls.__name__}, {fn!r}): expected a function "
            f"fn(obj) -> (children, rebuild), got an object of type {type(fn).__name__}."
        )
    MOVERS[cls] = fn
    reset_caches()


reset_caches()
