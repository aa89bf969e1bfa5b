"""`to_device` and the walkers under hostile input: other threads, long cycles, huge structures.

No test here times anything: growth is checked on memory (tracemalloc), which does not depend on
the machine's load; the times are reported by `benchmarks/bench_scale.py`.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import devicekit

META = torch.device("meta")
CPU = torch.device("cpu")


# --- a dict changed by another thread (issue 18, item 1) ----------------------------------------


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Threads switch every few microseconds, so that races happen within a few calls."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def _reorderer(batch: dict[str, Any], stop: threading.Event) -> threading.Thread:
    """A thread that keeps moving random keys of `batch` to its end, with their own values."""
    rng = random.Random(0)
    keys = list(batch)

    def reorder() -> None:
        while not stop.is_set():
            key = rng.choice(keys)
            value = batch.pop(key, None)
            if value is not None:
                batch[key] = value

    return threading.Thread(target=reorder, daemon=True)


def _check_pairs(moved: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every value is under its own key (its shape tells which key it belongs to), moved."""
    assert set(moved) <= set(shapes)
    for key, value in moved.items():
        assert value.shape == shapes[key], key
        assert value.device == META


LAYOUTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "flat dict (fast path)": lambda batch: batch,
    "nested dict (fast path)": lambda batch: {"inputs": batch, "n": 3},
    "general walk (skip=)": lambda batch: batch,
}


@pytest.mark.usefixtures("fast_switching")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_values_stay_under_their_keys_while_another_thread_reorders_them(layout: str) -> None:
    batch = {f"k{i}": torch.zeros(i + 1) for i in range(48)}
    shapes = {key: tuple(value.shape) for key, value in batch.items()}
    options: dict[str, Any] = {"skip": ()} if layout.startswith("general") else {}
    stop = threading.Event()
    thread = _reorderer(batch, stop)
    thread.start()
    moved_calls = 0
    try:
        for _ in range(150):
            try:
                moved = devicekit.to_device(LAYOUTS[layout](batch), "meta", **options)
            except devicekit.DevicekitError:  # refusing is allowed; pairing wrongly is not
                continue
            _check_pairs(
                moved if layout.startswith(("flat", "general")) else moved["inputs"], shapes
            )
            moved_calls += 1
    finally:
        stop.set()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert moved_calls > 0


# --- cycles through long chains of immutable containers (issue 18, item 9) ----------------------


def _tuple_cycle(length: int) -> tuple[list[Any], Any]:
    """A list holding a tensor and a chain of `length` tuples whose last holds the list."""
    root: list[Any] = [torch.ones(2)]
    link: Any = root
    for _ in range(length):
        link = (link,)
    root.append(link)
    return root, link


@pytest.mark.parametrize("start", ["list", "outermost tuple"])
def test_a_cycle_through_thousands_of_tuples_moves_and_stays_a_cycle(start: str) -> None:
    root, outer = _tuple_cycle(5_000)
    moved = devicekit.to_device(root if start == "list" else outer, "meta")
    new_root = moved
    if start == "outermost tuple":  # follow the chain down to the list
        while type(new_root) is tuple:
            new_root = new_root[0]
    assert type(new_root) is list
    assert new_root[0].device == META
    link = new_root[1]
    for _ in range(5_000 - 1):
        link = link[0]
    assert link[0] is new_root  # the same cycle, rebuilt
    assert root[0].device == CPU  # the input is unchanged


# --- self-containing containers already in place (issue 18, item 15) ---------------------------


def test_self_containing_containers_already_in_place_come_back_as_themselves() -> None:
    items: list[Any] = [torch.ones(1, device="meta")]
    items.append(items)
    mapping: dict[str, Any] = {"x": torch.ones(1, device="meta"), "more": [items]}
    mapping["self"] = mapping
    assert devicekit.to_device(items, "meta") is items
    assert devicekit.to_device(mapping, "meta") is mapping
    with_model: list[Any] = [torch.ones(1), torch.nn.Linear(1, 1)]
    with_model.append(with_model)
    assert devicekit.to_device(with_model, "cpu") is with_model


def test_a_self_containing_list_that_moves_is_rebuilt_as_the_same_cycle() -> None:
    items: list[Any] = [torch.ones(1)]
    items.append(items)
    moved = devicekit.to_device(items, "meta")
    assert moved is not items
    assert moved[1] is moved
    assert moved[0].device == META


# --- a tensor inside and outside a `.to()` object (issue 18, item 15) ---------------------------


class Holder:
    """A `.to()` object: devicekit hands it the move and cannot see what it does inside."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def to(self, device: torch.device) -> Holder:
        return Holder(self.tensor.to(device))


def test_a_tensor_inside_and_outside_a_to_object_is_moved_by_each() -> None:
    """As docs/moving-data.md says: aliasing is kept among what devicekit moves itself; a
    `.to()` object moves its own tensors, so a tensor shared with it arrives twice."""
    shared = torch.ones(3)
    moved = devicekit.to_device({"holder": Holder(shared), "x": shared, "y": shared}, "meta")
    assert moved["x"] is moved["y"]  # moved once by devicekit
    assert moved["holder"].tensor is not moved["x"]  # and once by Holder.to
    assert moved["holder"].tensor.shape == moved["x"].shape


# --- objects whose attributes raise, under strict=True (issue 18, item 10) ----------------------


class Slotted:
    __slots__ = ("tensor", "unset")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no {name}")


def test_strict_looks_around_attributes_that_raise() -> None:
    with pytest.raises(devicekit.UnmovableError) as caught:
        devicekit.to_device({"s": Slotted(torch.ones(1))}, "meta", strict=True)
    assert caught.value.path == "batch['s'].tensor"


# --- the walkers stay linear (issue 18, item 8) -------------------------------------------------


@dataclasses.dataclass
class Node:
    value: torch.Tensor
    next: Any = None


def _chain(length: int) -> Node | None:
    head = None
    for _ in range(length):
        head = Node(torch.zeros(1), head)
    return head


def _peak_bytes(function: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


WALKERS: dict[str, Callable[[Any], object]] = {
    "devices_of": devicekit.devices_of,
    "find_device": devicekit.find_device,
    "colocate": devicekit.colocate,
}


@pytest.mark.parametrize("walker", list(WALKERS))
def test_walkers_on_a_linked_chain_use_memory_in_proportion_to_it(walker: str) -> None:
    """Twice the chain, about twice the memory: paths are rendered when read, not all built
    (building every path of a chain is quadratic: four times the memory for twice the chain)."""
    short, long = _chain(1_500), _chain(3_000)
    ratio = _peak_bytes(lambda: WALKERS[walker](long)) / _peak_bytes(lambda: WALKERS[walker](short))
    assert ratio < 3, ratio


def test_the_paths_of_a_long_chain_read_correctly() -> None:
    head = _chain(2_000)
    mixed = Node(torch.zeros(1, device="meta"), head)
    with pytest.raises(devicekit.MixedDevicesError) as caught:
        devicekit.find_device(mixed)
    paths = caught.value.devices[CPU]
    assert len(paths) == 2_000
    assert paths[0] == "batch.next.value"
    assert paths[-1] == "batch" + ".next" * 2_000 + ".value"
    assert caught.value.devices[META] == ["batch.value"]
    assert "cpu: batch.next.value, batch.next.next.value, batch.next.next.next.value and " in (
        str(caught.value)
    )
