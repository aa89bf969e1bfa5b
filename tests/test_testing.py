from __future__ import annotations

import collections
import dataclasses
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import devicekit
from devicekit import testing
from devicekit.testing import (
    DTYPES,
    Carrier,
    Items,
    Pair,
    Record,
    Row,
    Snapshot,
    available_devices,
    device_specs,
    nested_batches,
    tensors,
)
from tests.machine import REAL_CUDA

pytest_plugins = ["pytester"]


def test_dtypes_cover_every_kind_torch_has() -> None:
    names = {str(dtype).removeprefix("torch.") for dtype in DTYPES}
    for expected in (
        "float32",
        "float64",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "complex64",
        "complex128",
        "int8",
        "int64",
        "uint8",
        "uint16",
        "uint64",
        "bool",
    ):
        assert expected in names
    assert not {"qint8", "bits8", "int4"} & names


@settings(max_examples=50)
@given(tensors(max_dims=3, max_side=4))
def test_tensors_respect_their_bounds(tensor: torch.Tensor) -> None:
    assert tensor.dim() <= 3
    assert all(size <= 4 for size in tensor.shape)
    assert tensor.dtype in DTYPES
    assert tensor.device == torch.device("cpu")


@settings(max_examples=30)
@given(tensors(dtypes=[torch.int32, torch.bool], devices=["meta"]))
def test_tensors_use_the_requested_dtypes_and_devices(tensor: torch.Tensor) -> None:
    assert tensor.dtype in (torch.int32, torch.bool)
    assert tensor.device.type == "meta"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_is_drawn(dtype: torch.dtype) -> None:
    found = find(tensors(), lambda t: t.dtype == dtype and t.numel() > 0)
    assert found.dtype == dtype


AWKWARD: dict[str, Callable[[torch.Tensor], bool]] = {
    "0-dim": lambda t: t.dim() == 0,
    "empty": lambda t: t.numel() == 0,
    "transposed": lambda t: t.dim() >= 2 and not t.is_contiguous() and t.stride(-1) != 1,
    "strided": lambda t: t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) == 2,
    "expanded": lambda t: t.dim() >= 1 and 0 in t.stride() and t.numel() > 1,
    "offset": lambda t: t.storage_offset() > 0,
}


@pytest.mark.parametrize("layout", AWKWARD)
def test_awkward_tensors_are_drawn(layout: str) -> None:
    wanted = AWKWARD[layout]
    found = find(tensors(), wanted)
    assert wanted(found)
    # Each awkward kind is a real view with real values: the same numbers as a dense copy.
    dense = found.contiguous()
    assert dense.is_contiguous()
    assert found.shape == dense.shape
    assert found.cpu().tolist() == dense.tolist()


def test_every_awkward_layout_is_checked_above() -> None:
    assert set(testing._LAYOUTS) - {"contiguous"} <= set(AWKWARD)


@settings(max_examples=40)
@given(device_specs())
def test_valid_specs_are_accepted(spec: object) -> None:
    assert isinstance(devicekit.as_device(spec), torch.device)  # type: ignore[arg-type]


@settings(max_examples=40)
@given(device_specs(valid=False))
def test_invalid_specs_are_rejected(spec: object) -> None:
    with pytest.raises((devicekit.InvalidDeviceSpecError, devicekit.DeviceUnavailableError)):
        devicekit.as_device(spec)  # type: ignore[arg-type]


def test_both_kinds_of_spec_are_drawn_when_asked() -> None:
    assert find(device_specs(valid=None), lambda spec: spec == "cuda:x") == "cuda:x"
    assert find(device_specs(valid=None), lambda spec: spec == "cpu") == "cpu"


@settings(max_examples=20)
@given(available_devices())
def test_available_devices_are_this_machines(device: torch.device) -> None:
    assert device in [info.device for info in devicekit.devices()]


@pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")
def test_available_devices_include_simulated_ones() -> None:
    with devicekit.simulated_devices("cuda", 2):
        assert find(available_devices(), lambda d: d.type == "cuda") == torch.device("cuda", 0)
        assert find(device_specs(), lambda spec: spec == "cuda:1") == "cuda:1"


@pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")
def test_one_strategy_object_reads_the_devices_at_every_draw() -> None:
    devices, specs = available_devices(), device_specs()
    cuda_1 = torch.device("cuda", 1)
    assert find(devices, lambda d: True) == torch.device("cpu")  # first drawn outside
    assert find(specs, lambda spec: spec == "cpu") == "cpu"
    with devicekit.simulated_devices("cuda", 2):
        assert find(devices, lambda d: d.type == "cuda") == torch.device("cuda", 0)
        assert find(devices, lambda d: d == cuda_1) == cuda_1
        assert find(specs, lambda spec: spec == "cuda:1") == "cuda:1"
    # Left: the simulated devices are gone from the same objects' draws again.
    with pytest.raises(NoSuchExample):
        find(devices, lambda d: d.type == "cuda", settings=settings(database=None))
    with pytest.raises(NoSuchExample):
        find(specs, lambda spec: "cuda" in str(spec), settings=settings(database=None))


def test_meta_is_drawn_only_when_asked() -> None:
    assert find(available_devices(meta=True), lambda d: d.type == "meta").type == "meta"


def _walk(obj: object, seen: set[int] | None = None) -> list[object]:
    """Every object reachable in a batch, each once (cycles included)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = [obj]
    if isinstance(obj, (dict, types.MappingProxyType)):
        children: list[object] = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        children = list(obj)
    elif isinstance(obj, Carrier):
        children = [obj.payload]
    elif dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    else:
        children = []
    for child in children:
        found.extend(_walk(child, seen))
    return found


def _has_cycle(obj: object, stack: tuple[int, ...] = ()) -> bool:
    if id(obj) in stack:
        return True
    stack = (*stack, id(obj))
    if isinstance(obj, dict):
        return any(_has_cycle(value, stack) for value in obj.values())
    if isinstance(obj, list):
        return any(_has_cycle(value, stack) for value in obj)
    if isinstance(obj, tuple):
        return any(_has_cycle(value, stack) for value in obj)
    return False


@pytest.mark.parametrize(
    "kind",
    [
        list,
        tuple,
        dict,
        collections.OrderedDict,
        collections.defaultdict,
        collections.deque,
        set,
        frozenset,
        Pair,
        torch.return_types.max,
        Record,
        Snapshot,
        Items,
        Row,
        types.MappingProxyType,
        Carrier,
    ],
    ids=lambda kind: kind.__name__,
)
def test_every_container_is_drawn(kind: type) -> None:
    batch = find(nested_batches(), lambda b: any(type(o) is kind for o in _walk(b)))
    assert any(type(o) is kind for o in _walk(batch))


def test_deques_keep_a_maxlen_and_defaultdicts_a_factory() -> None:
    batch = find(nested_batches(), lambda b: isinstance(b, collections.deque))
    assert isinstance(batch, collections.deque)
    assert batch.maxlen is not None
    mapping = find(nested_batches(), lambda b: isinstance(b, collections.defaultdict))
    assert isinstance(mapping, collections.defaultdict)
    assert mapping.default_factory is list


def _tensors_in(batch: object) -> list[torch.Tensor]:
    return [o for o in _walk_all(batch) if isinstance(o, torch.Tensor)]


def _walk_all(obj: object) -> list[object]:
    """Like `_walk`, but an object reached twice is listed twice (cycles still end)."""
    found: list[object] = []
    stack: list[tuple[object, tuple[int, ...]]] = [(obj, ())]
    while stack:
        item, path = stack.pop()
        found.append(item)
        if id(item) in path:
            continue
        if isinstance(item, (dict, types.MappingProxyType)):
            children: list[object] = list(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, collections.deque)):
            children = list(item)
        elif isinstance(item, Carrier):
            children = [item.payload]
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            children = [getattr(item, f.name) for f in dataclasses.fields(item)]
        else:
            children = []
        stack.extend((child, (*path, id(item))) for child in children)
    return found


def test_the_same_tensor_appears_twice() -> None:
    def shared(batch: object) -> bool:
        found = _tensors_in(batch)
        return len({id(t) for t in found}) < len(found)

    assert shared(find(nested_batches(), shared))


def test_views_of_one_storage_appear_side_by_side() -> None:
    def views(batch: object) -> bool:
        found = {id(t): t for t in _tensors_in(batch) if t.numel() > 0}.values()
        pointers = [t.untyped_storage().data_ptr() for t in found]
        return len(set(pointers)) < len(pointers)

    assert views(find(nested_batches(), views))


def test_no_aliasing_when_turned_off() -> None:
    @settings(max_examples=30)
    @given(nested_batches(aliasing=False, leaves=tensors(max_dims=1)))
    def check(batch: object) -> None:
        found = _tensors_in(batch)
        assert len({id(t) for t in found}) == len(found)

    check()


def test_cycles_only_when_asked() -> None:
    assert _has_cycle(find(nested_batches(cycles=True), _has_cycle))

    @settings(max_examples=30)
    @given(nested_batches())
    def check(batch: object) -> None:
        assert not _has_cycle(batch)

    check()


@settings(max_examples=30)
@given(nested_batches(max_depth=2, leaves=st.just(0)))
def test_depth_is_bounded(batch: object) -> None:
    def depth(obj: object) -> int:
        if isinstance(obj, (dict, types.MappingProxyType)):
            return 1 + max((depth(v) for v in obj.values()), default=0)
        if isinstance(obj, Carrier):  # the carrier and its list are one level
            return depth(obj.payload)
        if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            return 1 + max((depth(v) for v in obj), default=0)
        if dataclasses.is_dataclass(obj):
            return 1 + max(
                (depth(getattr(obj, f.name)) for f in dataclasses.fields(obj)), default=0
            )
        return 0

    assert depth(batch) <= 2


def test_not_imported_by_devicekit() -> None:
    assert "testing" not in devicekit.__all__
    assert testing.__name__ == "devicekit.testing"


COUNTED = """
    from hypothesis import given, settings, strategies as st

    RUNS = {"own": 0, "profile": 0}

    @settings(max_examples=10)
    @given(st.integers())
    def test_own_count(n):
        RUNS["own"] += 1

    @given(st.integers())
    def test_profile_count(n):
        RUNS["profile"] += 1

    def test_zz_report():
        print("RUNS", RUNS["own"], RUNS["profile"])
"""


@pytest.mark.parametrize(
    ("profile", "own", "default"),
    [("", 10, 100), ("ci", 10, 100), ("soak", 5000, 5000)],
    ids=["unset", "ci", "soak"],
)
def test_the_hypothesis_profile_is_chosen_by_an_environment_variable(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    profile: str,
    own: int,
    default: int,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("DEVICEKIT_HYPOTHESIS_PROFILE", profile)
    pytester.makeconftest("from tests.conftest import *  # noqa: F403\n")
    pytester.makepyfile(test_counted=COUNTED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "-q")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([f"*RUNS {own} {default}"])


def test_an_unknown_hypothesis_profile_is_refused(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("DEVICEKIT_HYPOTHESIS_PROFILE", "thorough")
    pytester.makeconftest("from tests.conftest import *  # noqa: F403\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*DEVICEKIT_HYPOTHESIS_PROFILE='thorough': expected 'ci' (the default) or 'soak'.*"]
    )
