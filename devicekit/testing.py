"""Hypothesis strategies for testing device-handling code (yours and devicekit's).

Import it explicitly (`from devicekit import testing`); `import devicekit` does not import
hypothesis. Every strategy draws what real training code meets: device specs users write,
tensors of every dtype and awkward layout, and nested batches with shared and cyclic parts.

Example:
    >>> from hypothesis import given
    >>> from devicekit.testing import tensors
    >>> @given(tensors())
    ... def test_clone_keeps_shape(t):
    ...     assert t.clone().shape == t.shape
    >>> test_clone_keeps_shape()
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from hypothesis import strategies as st

import devicekit
from devicekit._audit import Severity, severity_rank

__all__ = [
    "DTYPES",
    "Carrier",
    "Items",
    "Pair",
    "Record",
    "Row",
    "Snapshot",
    "assert_movable",
    "available_devices",
    "device_specs",
    "dtypes",
    "nested_batches",
    "tensors",
]


class Pair(NamedTuple):
    """A namedtuple that `nested_batches` puts tensors in."""

    first: Any
    second: Any


@dataclasses.dataclass
class Record:
    """A mutable dataclass that `nested_batches` puts tensors in."""

    value: Any
    extra: Any = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A frozen dataclass with an `init=False` field, which movers must keep too."""

    value: Any
    kind: str = dataclasses.field(init=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", type(self.value).__name__)


# torch warns (once per process) that complex32 support is experimental.
_EXPERIMENTAL = frozenset({torch.complex32})


class Items(list):  # type: ignore[type-arg]
    """A list subclass that `nested_batches` puts tensors in."""


class Row(tuple):  # type: ignore[type-arg]
    """A tuple subclass (not a namedtuple) that `nested_batches` puts tensors in."""


class Carrier:
    """An object with its own `.to(device)`, as `BatchEncoding` or `TensorDict` have.

    `.to()` returns a new `Carrier` holding `payload` moved with `devicekit.to_device`.
    """

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def to(self, *args: Any, **kwargs: Any) -> Carrier:
        return Carrier(devicekit.to_device(self.payload, *args, **kwargs))

    def __repr__(self) -> str:
        return f"Carrier({self.payload!r})"


@functools.cache
def _usable_dtypes() -> tuple[torch.dtype, ...]:
    """Every torch dtype that holds values on the CPU without warnings."""
    found: dict[str, torch.dtype] = {}
    for value in vars(torch).values():
        if not isinstance(value, torch.dtype) or str(value) in found or value in _EXPERIMENTAL:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                sample = torch.arange(4, dtype=torch.float64).to(value)
                sample[::2].clone().to("meta")
        except (RuntimeError, NotImplementedError, UserWarning, TypeError):
            continue
        found[str(value)] = value
    return tuple(found[name] for name in sorted(found))


#: Every dtype `tensors()` draws from by default: all of torch's dtypes that hold values on the
#: CPU (floating point including float8, complex, signed and unsigned integers, bool). The
#: sub-byte, bit and quantized dtypes cannot be filled with values and are left out, and so is
#: the experimental complex32.
DTYPES: tuple[torch.dtype, ...] = _usable_dtypes()


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """Every dtype in `DTYPES`.

    Example:
        >>> from hypothesis import find
        >>> from devicekit.testing import dtypes
        >>> find(dtypes(), lambda dtype: dtype.is_complex)
        torch.complex128
    """
    return st.sampled_from(DTYPES)


_VALID_WORDS = ("cpu", "cpu:0", "meta", "auto", "accelerator", "gpu")
_INVALID_SPECS: tuple[object, ...] = (
    "",
    " ",
    "cuda:x",
    "cuda:-1",
    "cuda:01",
    "cuda:1.0",
    "CUDA",
    "cpu:",
    ":0",
    "cuda 0",
    "cuda:128",
    "warp_drive",
    "warp_drive:0",
    -1,
    3.5,
    True,
    b"cpu",
    ["cpu"],
    object(),
)


T = TypeVar("T")


def _read_when_drawn(read: Callable[[], Sequence[T]]) -> st.SearchStrategy[T]:
    """One of the values `read()` returns at each draw (not at the first draw only, as
    `st.deferred` would): the same strategy object follows the devices of the moment, such as
    those of a `simulated_devices` block entered after it was made. Shrinks to `read()[0]`."""

    @st.composite
    def one_of_the_current(draw: st.DrawFn) -> T:
        values = read()
        return values[draw(st.integers(0, len(values) - 1))]

    return one_of_the_current()


def _accepts(spec: object) -> bool:
    try:
        devicekit.as_device(spec)  # type: ignore[arg-type]
    except devicekit.DevicekitError:
        return False
    return True


def _valid_specs() -> list[object]:
    specs: list[object] = [None, torch.device("cpu"), torch.device("meta")]
    specs.extend(_VALID_WORDS)
    for info in devicekit.devices():
        if info.index is not None:
            specs.extend([str(info.device), info.device, info.index, info.type])
    return [spec for spec in specs if _accepts(spec)]


def device_specs(*, valid: bool | None = True) -> st.SearchStrategy[object]:
    """Device specs as users write them: strings, `torch.device`s, indices, `None`.

    Valid specs are those `devicekit.as_device` accepts on this machine, judged at every draw:
    one strategy object made outside `simulated_devices` draws the simulated devices inside it,
    and stops drawing them after it.

    Args:
        valid: `True` for accepted specs only, `False` for rejected ones only (malformed, like
            `"cuda:x"`, or naming devices this machine lacks, like `"cuda:128"`), `None` for
            both.

    Example:
        >>> from hypothesis import find
        >>> from devicekit.testing import device_specs
        >>> find(device_specs(valid=False), lambda spec: isinstance(spec, str) and ":" in spec)
        'cuda:x'
    """
    good = _read_when_drawn(_valid_specs)
    bad = st.sampled_from(_INVALID_SPECS).filter(lambda spec: not _accepts(spec))
    if valid is None:
        return st.one_of(good, bad)
    return good if valid else bad


def available_devices(*, meta: bool = False) -> st.SearchStrategy[torch.device]:
    """The devices of this machine (`devicekit.devices()`), read at every draw.

    Inside `simulated_devices` this includes the simulated devices, even for a strategy object
    made before the block was entered (and not after it is left). Shrinks towards `cpu`.

    Args:
        meta: Also draw the `meta` device.

    Example:
        >>> from hypothesis import find
        >>> from devicekit.testing import available_devices
        >>> find(available_devices(), lambda device: True)
        device(type='cpu')
    """

    def listed() -> list[torch.device]:
        found = [info.device for info in devicekit.devices()]
        if meta:
            found.append(torch.device("meta"))
        return found

    return _read_when_drawn(listed)


_LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset")


def _fill(shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=generator).bool()
    if dtype.is_complex:
        real = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
        return torch.complex(real, real.flip(-1) if real.dim() else real).to(dtype)
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(dtype)
    return torch.randint(0, 100, tuple(shape), generator=generator).to(dtype)


def _with_layout(shape: list[int], dtype: torch.dtype, seed: int, layout: str) -> torch.Tensor:
    if layout == "transposed" and len(shape) >= 2:
        return _fill([*shape[:-2], shape[-1], shape[-2]], dtype, seed).mT
    if layout == "strided" and shape:
        bigger = _fill([*shape[:-1], shape[-1] * 2], dtype, seed)
        return bigger[..., ::2]
    if layout == "expanded" and shape:
        return _fill([1, *shape[1:]], dtype, seed).expand(shape)
    if layout == "offset":
        flat = _fill([_numel(shape) + 3], dtype, seed)
        return flat[3:].view(shape)
    return _fill(shape, dtype, seed)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


@st.composite
def _tensor(
    draw: st.DrawFn,
    dtype_strategy: st.SearchStrategy[torch.dtype],
    device_strategy: st.SearchStrategy[torch.device],
    max_dims: int,
    max_side: int,
) -> torch.Tensor:
    dtype = draw(dtype_strategy)
    shape = draw(st.lists(st.integers(0, max_side), max_size=max_dims))
    layout = draw(st.sampled_from(_LAYOUTS))
    seed = draw(st.integers(0, 2**31 - 1))
    tensor = _with_layout(shape, dtype, seed, layout)
    device = draw(device_strategy)
    return tensor if device.type == "cpu" else tensor.to(device)


def tensors(
    *,
    dtypes: Sequence[torch.dtype] | st.SearchStrategy[torch.dtype] | None = None,
    devices: Sequence[object] | st.SearchStrategy[torch.device] | None = None,
    max_dims: int = 3,
    max_side: int = 4,
) -> st.SearchStrategy[torch.Tensor]:
    """Tensors with real values: 0-dim, empty, non-contiguous (transposed, strided, expanded,
    offset views), of every dtype torch has (see `DTYPES`).

    Args:
        dtypes: The dtypes to draw from (a sequence or a strategy); default every one.
        devices: The devices to put the tensors on (specs or a strategy); default `cpu`.
        max_dims: The most dimensions a tensor gets.
        max_side: The longest a dimension gets (dimensions of size 0 are drawn too).

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from devicekit.testing import tensors
        >>> t = find(tensors(devices=["meta"]), lambda t: not t.is_contiguous())
        >>> t.device.type, t.dim() >= 1
        ('meta', True)
    """
    if dtypes is None:
        dtype_strategy: st.SearchStrategy[torch.dtype] = st.sampled_from(DTYPES)
    elif isinstance(dtypes, st.SearchStrategy):
        dtype_strategy = dtypes
    else:
        dtype_strategy = st.sampled_from(tuple(dtypes))
    if devices is None:
        device_strategy: st.SearchStrategy[torch.device] = st.just(torch.device("cpu"))
    elif isinstance(devices, st.SearchStrategy):
        device_strategy = devices
    else:
        device_strategy = st.sampled_from(
            [devicekit.as_device(spec, check=False) for spec in devices]  # type: ignore[arg-type]
        )
    return _tensor(dtype_strategy, device_strategy, max_dims, max_side)


def _other_leaves() -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.integers(-5, 5),
        st.floats(allow_nan=False, width=32),
        st.text(max_size=3),
        st.booleans(),
    )


_CONTAINERS = (
    "list",
    "list_subclass",
    "tuple",
    "tuple_subclass",
    "dict",
    "mappingproxy",
    "carrier",
    "ordereddict",
    "defaultdict",
    "deque",
    "set",
    "frozenset",
    "namedtuple",
    "return_types",
    "dataclass",
    "frozen_dataclass",
)


_ACYCLIC_CONTAINERS = tuple(kind for kind in _CONTAINERS if kind != "carrier")


def _build(kind: str, items: list[object], keys: list[str]) -> object:
    if kind == "list":
        return list(items)
    if kind == "list_subclass":
        return Items(items)
    if kind == "tuple":
        return tuple(items)
    if kind == "tuple_subclass":
        return Row(items)
    if kind == "mappingproxy":
        return types.MappingProxyType(dict(zip(keys, items, strict=False)))
    if kind == "carrier":
        return Carrier(list(items))
    if kind == "dict":
        return dict(zip(keys, items, strict=False))
    if kind == "ordereddict":
        return collections.OrderedDict(zip(keys, items, strict=False))
    if kind == "defaultdict":
        made: collections.defaultdict[str, object] = collections.defaultdict(list)
        made.update(zip(keys, items, strict=False))
        return made
    if kind == "deque":
        return collections.deque(items, maxlen=len(items) + 2)
    if kind in ("set", "frozenset"):
        hashable = [item for item in items if _hashable(item)]
        return set(hashable) if kind == "set" else frozenset(hashable)
    padded = [*items, None, None]
    if kind == "namedtuple":
        return Pair(padded[0], padded[1])
    if kind == "return_types":
        pair: Any = (padded[0], padded[1])
        return torch.return_types.max(pair)
    if kind == "dataclass":
        return Record(padded[0], padded[1])
    return Snapshot(padded[0])


def _hashable(item: object) -> bool:
    try:
        hash(item)
    except TypeError:
        return False
    return True


@st.composite
def _nested(
    draw: st.DrawFn,
    leaves: st.SearchStrategy[object],
    max_depth: int,
    aliasing: bool,
    cycles: bool,
) -> object:
    pool = draw(st.lists(leaves, min_size=1, max_size=4)) if aliasing else []
    tensors_in_pool = [leaf for leaf in pool if isinstance(leaf, torch.Tensor)]

    def leaf() -> object:
        if not aliasing:
            return draw(leaves)
        if len(tensors_in_pool) > 0 and draw(st.booleans()):
            shared = draw(st.sampled_from(tensors_in_pool))
            how = draw(st.sampled_from(["same", "view", "slice"]))
            if how == "view" and shared.is_contiguous():
                return shared.view(-1)
            if how == "slice" and shared.dim() > 0:
                return shared[: max(1, shared.shape[0] // 2)]
            return shared
        return draw(st.sampled_from(pool)) if draw(st.booleans()) else draw(leaves)

    mutable: list[list[object] | dict[str, object]] = []

    def node(depth: int) -> object:
        if depth >= max_depth or draw(st.integers(0, 3)) == 0:
            return leaf()
        # A `.to()` object moves its own contents: a cycle through one would never end.
        kind = draw(st.sampled_from(_ACYCLIC_CONTAINERS if cycles else _CONTAINERS))
        count = draw(st.integers(0, 3))
        items = [node(depth + 1) for _ in range(count)]
        keys = [f"k{i}" for i in range(count)]
        built = _build(kind, items, keys)
        if isinstance(built, (list, dict)):
            mutable.append(built)
        return built

    root = node(0)
    if cycles and mutable:
        target = draw(st.sampled_from(mutable))
        back = root if draw(st.booleans()) else target
        if isinstance(target, list):
            target.append(back)
        else:
            target["cycle"] = back
    return root


def nested_batches(
    *,
    leaves: st.SearchStrategy[object] | None = None,
    max_depth: int = 3,
    aliasing: bool = True,
    cycles: bool = False,
) -> st.SearchStrategy[object]:
    """Nested batches in every container `to_device` rebuilds, with shared and cyclic parts.

    Containers: `list` and a list subclass (`Items`), `tuple` and a tuple subclass (`Row`),
    `dict`, `OrderedDict`, `defaultdict` (factory `list`), a read-only mapping
    (`types.MappingProxyType`), `deque` (with `maxlen`), `set`, `frozenset`, a namedtuple
    (`Pair`), a torch return type (`torch.return_types.max`), a dataclass (`Record`), a frozen
    dataclass with an `init=False` field (`Snapshot`), and an object with its own `.to()`
    (`Carrier`). Leaves mix tensors with `None`, numbers and strings.

    Args:
        leaves: The leaf strategy; default `tensors()` mixed with plain Python values.
        max_depth: The deepest nesting drawn.
        aliasing: Let one tensor appear several times, and views of one storage appear
            side by side.
        cycles: Close one cycle: a list or dict that contains itself or the root (and draw no
            `Carrier`, whose `.to()` could not end on a cycle).

    Example:
        >>> from hypothesis import find
        >>> from devicekit.testing import Pair, nested_batches
        >>> type(find(nested_batches(), lambda batch: isinstance(batch, Pair))).__name__
        'Pair'
    """
    if leaves is None:
        leaves = st.one_of(tensors(max_dims=2, max_side=3), _other_leaves())
    return _nested(leaves, max_depth, aliasing, cycles)


def assert_movable(
    obj: Any, *, name: str = "model", fail_on: Severity = "error"
) -> devicekit.AuditReport:
    """Fail the test when `devicekit.audit` finds device bugs in `obj`, listing them.

    Nothing runs: the model is only looked at (see `devicekit.audit`). Warnings, such as a model
    on several devices, fail only with `fail_on="warning"`.

    Args:
        obj: The model (or any nested structure) to audit.
        name: What to call `obj` in the paths of the findings.
        fail_on: The least severity that fails: `"error"` (the default), `"warning"` or
            `"info"`.

    Returns:
        The whole report, when nothing failed (to assert more about it).

    Raises:
        AuditError: The audit found something of `fail_on` severity or worse; an
            `AssertionError`, whose message lists the findings with their fixes.
        InvalidArgumentError: `fail_on` is not a severity, or `name` is not a non-empty string.

    Example:
        >>> import torch
        >>> from devicekit.testing import assert_movable
        >>> assert_movable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        AuditReport([], name='model')
    """
    __tracebackhide__ = True
    severity_rank(fail_on, f"assert_movable(fail_on={fail_on!r})")
    report = devicekit.audit(obj, name=name, info=fail_on == "info")
    failing = report.at_least(fail_on)
    if failing:
        raise devicekit.AuditError(
            failing._format(f"assert_movable({name})", fail_on), report=failing
        )
    return report
