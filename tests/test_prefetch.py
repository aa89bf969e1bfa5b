"""`devicekit.prefetch`: the pass-through on CPU and meta, and the stream path under simulated
CUDA (a thread reading and copying ahead, events, `record_stream`), its robustness (early exits,
failures, interrupts, collected iterators), the static buffers, and hypothesis properties."""

from __future__ import annotations

import _thread
import collections
import contextlib
import dataclasses
import functools
import gc
import threading
import time
import traceback
import types
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import devicekit
from devicekit.testing import Carrier, nested_batches

JOIN = 120.0  # seconds: the longest any test waits for a thread


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("devicekit-prefetch")]


def assert_no_thread_left() -> None:
    """Every prefetch thread ends (they stop within a fraction of a second once told)."""
    deadline = time.monotonic() + JOIN
    for thread in prefetch_threads():
        thread.join(max(deadline - time.monotonic(), 0.0))
    assert prefetch_threads() == []


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    yield
    gc.collect()
    assert_no_thread_left()


@contextmanager
def simulated_cuda(count: int = 1, *, races: bool = False) -> Iterator[None]:
    with devicekit.simulated_devices("cuda", count, races=races):
        yield


def batches(count: int, *, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "x": torch.full((2, 3), float(i)),
            "ids": [torch.arange(i + 1), f"row{i}"],
            "big": torch.full((200, 100), float(i)),  # 80 KB: copied alone, pinned first
        }
        for i in range(start, start + count)
    ]


def bits(tensor: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    host = tensor.cpu()
    flat = torch.empty(host.shape, dtype=host.dtype).copy_(host).reshape(-1)
    return host.dtype, tuple(host.shape), bytes(flat.view(torch.uint8).tolist())


def canonical(value: Any) -> Any:
    """A device-free form of a set member: tensors as their bits, containers item by item."""
    kind = type(value).__name__
    if isinstance(value, torch.Tensor):
        return bits(value)
    if isinstance(value, Carrier):
        return kind, canonical(value.payload)
    if isinstance(value, (set, frozenset)):
        return kind, sorted(map(canonical, value), key=repr)
    if isinstance(value, Mapping):
        return kind, [(key, canonical(item)) for key, item in value.items()]
    if dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        return kind, [canonical(getattr(value, field.name)) for field in fields]
    if isinstance(value, (list, tuple, collections.deque)):
        return kind, [canonical(item) for item in value]
    return kind, repr(value)


def assert_same(moved: Any, source: Any, device: torch.device) -> None:
    """`moved` is `source` with every tensor on `device`: same types, structure and bits."""
    assert type(moved) is type(source)
    if isinstance(source, torch.Tensor):
        assert moved.device == device
        assert bits(moved) == bits(source)
    elif isinstance(source, (set, frozenset)):  # no order to follow: compare canonical forms
        assert sorted(map(canonical, moved), key=repr) == sorted(map(canonical, source), key=repr)
    elif isinstance(source, Carrier):
        assert_same(moved.payload, source.payload, device)
    elif isinstance(source, Mapping):
        assert list(moved) == list(source)
        for name in source:
            assert_same(moved[name], source[name], device)
    elif dataclasses.is_dataclass(source):
        for field in dataclasses.fields(source):
            assert_same(getattr(moved, field.name), getattr(source, field.name), device)
    elif isinstance(source, (list, tuple, collections.deque)):
        assert len(moved) == len(source)
        for a, b in zip(moved, source, strict=True):
            assert_same(a, b, device)
    else:
        assert moved == source


# ---------------------------------------------------------------------------------------------
# The interface


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_pass_through_moves_every_batch_in_order(device: str) -> None:
    source = batches(4)
    moved = list(devicekit.prefetch(source, device))
    assert len(moved) == 4
    for got, want in zip(moved, source, strict=True):
        assert got["ids"][1] == want["ids"][1]
        assert got["x"].device.type == device
        if device == "cpu":
            assert got["x"] is want["x"]  # to_device leaves tensors in place as they are


def test_device_none_is_the_current_default() -> None:
    with devicekit.default_device("meta"):
        batches_ = devicekit.prefetch(batches(2))
    assert batches_.device == torch.device("meta")
    assert [b["x"].device.type for b in batches_] == ["meta", "meta"]


def test_len_and_reiteration_follow_the_source() -> None:
    source = batches(3)
    prefetched = devicekit.prefetch(source, "cpu")
    assert len(prefetched) == 3
    assert [b["ids"][1] for b in prefetched] == [b["ids"][1] for b in prefetched]

    generated = devicekit.prefetch(iter(source), "cpu")
    assert not isinstance(generated, collections.abc.Sized)
    with pytest.raises(TypeError, match="has no len"):
        len(generated)
    assert len(list(generated)) == 3
    assert list(generated) == []  # an iterator source is used up, as it would be without


def test_len_and_passes_under_simulated_cuda() -> None:
    with simulated_cuda():
        prefetched = devicekit.prefetch(batches(3), "cuda")
        assert len(prefetched) == 3
        first = [b["ids"][1] for b in prefetched]
        second = [b["ids"][1] for b in prefetched]
    assert first == second == ["row0", "row1", "row2"]


def test_attributes_are_read_from_the_source() -> None:
    dataset = TensorDataset(torch.arange(10.0))
    loader = DataLoader(dataset, batch_size=4)
    prefetched = devicekit.prefetch(loader, "cpu")
    assert prefetched.dataset is dataset
    assert prefetched.batch_size == 4
    assert prefetched.sampler is loader.sampler
    assert len(prefetched) == 3
    with pytest.raises(
        AttributeError,
        match=r"'Prefetcher' object has no attribute 'nope', and neither has its source "
        r"\(a DataLoader\)",
    ):
        prefetched.nope  # noqa: B018


def test_set_epoch_reaches_the_source() -> None:
    class Epochs(list[int]):
        epoch = -1

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

    source = Epochs([1, 2])
    devicekit.prefetch(source, "cpu").set_epoch(7)
    assert source.epoch == 7


@pytest.mark.parametrize("simulate", [False, True])
def test_set_epoch_reaches_a_distributed_sampler(simulate: bool) -> None:
    dataset = TensorDataset(torch.arange(16))
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=2, rank=0, shuffle=True, seed=3
    )
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)

    def order(epoch: int) -> list[int]:
        sampler.set_epoch(epoch)
        return [int(v) for (batch,) in loader for v in batch]

    expected = {epoch: order(epoch) for epoch in (0, 1, 2)}
    assert expected[1] != expected[0]
    with simulated_cuda() if simulate else devicekit.default_device("cpu"):
        prefetched = devicekit.prefetch(loader, "cuda" if simulate else "cpu")
        for epoch in (2, 1, 0):
            prefetched.set_epoch(epoch)
            assert sampler.epoch == epoch
            got = [int(v) for (batch,) in prefetched for v in batch.cpu()]
            assert got == expected[epoch]


def test_set_epoch_without_a_sampler_says_so() -> None:
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(\.\.\.\)\.set_epoch\(1\): the source, a list, has no set_epoch "
        r"method and no sampler with one\. Call set_epoch on the sampler that shuffles",
    ):
        devicekit.prefetch([1], "cpu").set_epoch(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"depth": 0},
            r"prefetch\(depth=0\): expected a whole number of batches to copy ahead, "
            r"at least 1, got 0 \(an int\)\. Pass depth=2 \(the default\) or more\.",
        ),
        ({"depth": -1}, r"prefetch\(depth=-1\): .* got -1 \(an int\)"),
        ({"depth": 2.5}, r"prefetch\(depth=2\.5\): .* got 2\.5 \(a float\)"),
        ({"depth": True}, r"prefetch\(depth=True\): .* got True \(a bool\)"),
        ({"pin": "yes"}, r"prefetch\(pin='yes'\): expected True or False, got 'yes' \(a str\)\."),
        ({"static": 1}, r"prefetch\(static=1\): expected True or False, got 1 \(an int\)\."),
        (
            {"coalesce": "always"},
            r"prefetch\(coalesce='always'\): expected 'auto', True or "
            r"False, got 'always' \(a str\)\. Pass coalesce='auto' \(the default\) or a bool\.",
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(devicekit.InvalidArgumentError, match=f"^{message}"):
        devicekit.prefetch([], "cpu", **kwargs)


def test_a_non_iterable_source_is_refused() -> None:
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(iterable=3\): expected an iterable of batches \(a DataLoader, a "
        r"generator, a list\), got 3 \(an int\)\. Pass the loader itself, e\.g\. "
        r"devicekit\.prefetch\(loader, 'cuda'\)\.$",
    ):
        devicekit.prefetch(3, "cpu")  # type: ignore[arg-type]


def test_a_bad_device_is_refused() -> None:
    with pytest.raises(devicekit.InvalidDeviceSpecError, match="prefetch"):
        devicekit.prefetch([], "cuda:x")
    with pytest.raises(devicekit.DeviceUnavailableError, match="prefetch"):
        devicekit.prefetch([], "cuda:7")


# ---------------------------------------------------------------------------------------------
# The stream path, under simulated CUDA


def test_batches_arrive_on_the_device_with_their_values() -> None:
    source = batches(5)
    with simulated_cuda(2):
        moved = list(devicekit.prefetch(source, "cuda:1", depth=3))
        for got, want in zip(moved, source, strict=True):
            assert_same(got, want, torch.device("cuda", 1))


@dataclasses.dataclass
class Spy:
    """What the stream path did, in order, and in which thread."""

    calls: list[tuple[str, Any, Any, str]] = dataclasses.field(default_factory=list)

    def log(self, what: str, first: Any, second: Any) -> None:
        self.calls.append((what, first, second, threading.current_thread().name))


@contextmanager
def spying() -> Iterator[Spy]:
    """Record `Event.record`, `Stream.wait_event` and `Tensor.record_stream` calls (inside an
    active simulation; undone before it ends)."""
    spy = Spy()
    stream_type = type(torch.accelerator.current_stream())
    event_type = type(torch.Event(device="cuda"))
    wait_event, record, record_stream = (
        stream_type.wait_event,
        event_type.record,
        torch.Tensor.record_stream,
    )

    def spy_wait(stream: Any, event: Any) -> None:
        spy.log("wait_event", stream, event)
        wait_event(stream, event)

    def spy_record(event: Any, stream: Any = None) -> None:
        spy.log("record", event, stream)
        record(event, stream)

    @functools.wraps(record_stream)  # the simulation's mode answers it by its name
    def spy_record_stream(tensor: torch.Tensor, stream: Any) -> None:
        spy.log("record_stream", tensor, stream)
        record_stream(tensor, stream)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream_type, "wait_event", spy_wait)
        patch.setattr(event_type, "record", spy_record)
        patch.setattr(torch.Tensor, "record_stream", spy_record_stream)
        yield spy


def test_the_loop_stream_waits_on_the_copy_event_before_the_hand_over() -> None:
    with simulated_cuda():
        mine = torch.Stream(device="cuda")
        with spying() as spy:
            prefetched = devicekit.prefetch(batches(3), "cuda", depth=2)
            handed: list[int] = []
            with mine:  # the loop's stream: the one that must wait
                for batch in prefetched:
                    handed.append(len(spy.calls))
                    spy.log("hand_over", batch, None)
    waits = [(s, e, t) for what, s, e, t in spy.calls if what == "wait_event"]
    waited = {id(e) for _, e, _ in waits}
    # (to_device's staging buffer records events of its own, on the same side stream.)
    records = [(e, s, t) for what, e, s, t in spy.calls if what == "record" and id(e) in waited]
    assert len(records) == len(waits) == 3
    for (event, side, recorder), (stream, waited, waiter) in zip(records, waits, strict=True):
        assert waited is event  # each batch's own event
        assert recorder.startswith("devicekit-prefetch")  # recorded by the copying thread ...
        assert side != mine  # ... on a side stream
        assert stream == mine  # the loop's current stream waits
        assert waiter == threading.current_thread().name
    # Each wait comes before its batch is handed over.
    order = [what for what, *_ in spy.calls if what in ("wait_event", "hand_over")]
    assert order == ["wait_event", "hand_over"] * 3


def test_every_device_tensor_is_tied_to_the_loop_stream() -> None:
    source = batches(3)
    with simulated_cuda():
        loop_stream = torch.accelerator.current_stream()
        with spying() as spy:
            moved = list(devicekit.prefetch(source, "cuda"))
    recorded = [(t, s) for what, t, s, _ in spy.calls if what == "record_stream"]
    assert all(stream == loop_stream for _, stream in recorded)
    tied = {id(t) for t, _ in recorded}
    for batch in moved:
        for tensor in (batch["x"], batch["ids"][0], batch["big"]):
            assert id(tensor) in tied
    assert len(recorded) == 3 * 3


def test_the_side_stream_waits_for_tensors_on_another_device() -> None:
    waits: list[tuple[Any, Any]] = []

    def source() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(2):  # written on cuda:1's stream, in the thread that reads the loader
            yield {"x": torch.full((3,), float(i), device="cuda:1"), "y": torch.ones(2)}

    with simulated_cuda(2), pytest.MonkeyPatch.context() as patch:
        stream_type = type(torch.accelerator.current_stream())
        wait_stream = stream_type.wait_stream

        def spy(stream: Any, other: Any) -> None:
            waits.append((stream, other))
            wait_stream(stream, other)

        patch.setattr(stream_type, "wait_stream", spy)
        moved = list(devicekit.prefetch(source(), "cuda:0"))
        assert [b["x"].device for b in moved] == [torch.device("cuda", 0)] * 2
        assert [b["x"].cpu().tolist() for b in moved] == [[0.0] * 3, [1.0] * 3]
    assert len(waits) == 2
    assert all(other.device == torch.device("cuda", 1) for _, other in waits)
    assert all(stream.device == torch.device("cuda", 0) for stream, _ in waits)


def test_tensors_inside_objects_with_their_own_to_are_tied_too() -> None:
    source: list[dict[str, Any]] = [
        {"enc": Carrier([torch.ones(3)]), "x": torch.ones(2)} for _ in range(2)
    ]
    with simulated_cuda():
        with spying() as spy:
            moved = list(devicekit.prefetch(source, "cuda"))
        tied = {id(t) for what, t, _, _ in spy.calls if what == "record_stream"}
        for batch in moved:
            assert batch["enc"].payload[0].device == torch.device("cuda", 0)
            assert id(batch["enc"].payload[0]) in tied
            assert id(batch["x"]) in tied


def test_static_refuses_objects_with_their_own_to() -> None:
    source = [{"enc": Carrier([torch.ones(3)])}]
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(static=True\): batch\['enc'\] \(Carrier\) moves with its own \.to\(\), "
        r"so its tensors cannot be refilled in place\. Put its tensors in a dict",
    ):
        list(devicekit.prefetch(source, "cpu", static=True))


def test_current_streams_are_per_thread_in_the_simulation() -> None:
    # CUDA keeps the current stream per thread; prefetch's thread enters its side stream
    # while the loop's thread reads its own current stream.
    with simulated_cuda():
        main = torch.accelerator.current_stream()
        side = torch.Stream(device="cuda")
        seen: list[Any] = []
        entered, release = threading.Event(), threading.Event()

        def other() -> None:
            with side:
                seen.append(torch.accelerator.current_stream())
                entered.set()
                release.wait(JOIN)

        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(JOIN)
        assert torch.accelerator.current_stream() == main
        release.set()
        thread.join(JOIN)
    assert seen == [side]


def test_depth_bounds_the_batches_read_ahead() -> None:
    reads: list[int] = []

    def source() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(20):
            reads.append(i)
            yield {"x": torch.full((2,), float(i))}

    with simulated_cuda():
        for depth in (1, 3):
            reads.clear()
            iterator = iter(devicekit.prefetch(source(), "cuda", depth=depth))
            first = next(iterator)
            deadline = time.monotonic() + JOIN
            while len(reads) < depth + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # time enough to read more, if it would
            assert len(reads) == depth + 1  # the one handed over, and `depth` ahead
            assert first["x"].cpu().tolist() == [0.0, 0.0]
            del iterator, first


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_no_batch_is_kept_after_the_hand_over(device: str) -> None:
    def source() -> Iterator[dict[str, Any]]:
        for i in range(6):
            yield batches(1, start=i)[0]  # made when read: only the loop holds it

    with simulated_cuda():
        iterator = iter(devicekit.prefetch(source(), device, depth=2))
        refs = [weakref.ref(next(iterator)["big"]) for _ in range(3)]
        gc.collect()
        assert [ref() for ref in refs] == [None, None, None]
        del iterator


# ---------------------------------------------------------------------------------------------
# Early exits, failures, interrupts


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_break_stops_the_thread_and_closes_a_generator(device: str) -> None:
    closed = threading.Event()

    def source() -> Iterator[dict[str, torch.Tensor]]:
        try:
            for i in range(100):
                yield {"x": torch.full((2,), float(i))}
        finally:
            closed.set()

    with simulated_cuda():
        for i, _ in enumerate(devicekit.prefetch(source(), device)):
            if i == 2:
                break
        gc.collect()
        assert_no_thread_left()
        assert closed.wait(JOIN)


def test_an_abandoned_iterator_is_collected_with_its_thread() -> None:
    with simulated_cuda():
        iterator = iter(devicekit.prefetch(batches(10), "cuda"))
        next(iterator)
        assert len(prefetch_threads()) == 1
        ref = weakref.ref(iterator)
        del iterator
        gc.collect()
        assert ref() is None
        assert_no_thread_left()


def test_close_ends_the_thread() -> None:
    with simulated_cuda():
        iterator = iter(devicekit.prefetch(batches(10), "cuda"))
        next(iterator)
        iterator.close()  # type: ignore[attr-defined]
        assert prefetch_threads() == []
        with pytest.raises(StopIteration):
            next(iterator)


class Boom(Exception):
    pass


def failing_loader(good: int) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(good):
        yield {"x": torch.full((2,), float(i))}
    raise Boom(f"bad record {good}")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_loader_error_is_raised_in_the_loop_with_the_loader_frames(device: str) -> None:
    got: list[float] = []
    with simulated_cuda():
        iterator = iter(devicekit.prefetch(failing_loader(3), device))

        def loop() -> None:
            for batch in iterator:
                got.append(float(batch["x"][0].cpu()))

        with pytest.raises(Boom, match="bad record 3") as raised:
            loop()
        with pytest.raises(StopIteration):
            next(iterator)
    assert got == [0.0, 1.0, 2.0]
    frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert "failing_loader" in frames
    assert frames.index("failing_loader") > frames.index(
        "test_a_loader_error_is_raised_in_the_loop_with_the_loader_frames"
    )


def test_a_move_error_is_raised_in_the_loop() -> None:
    with simulated_cuda():
        source = [{"x": torch.ones(2)}, {"x": torch.ones(2, device="meta")}]
        with pytest.raises(devicekit.MoveError, match=r"batch\['x'\]"):
            list(devicekit.prefetch(source, "cuda"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_keyboard_interrupt_from_the_loader_reaches_the_loop(device: str) -> None:
    def source() -> Iterator[dict[str, torch.Tensor]]:
        yield {"x": torch.ones(2)}
        raise KeyboardInterrupt

    seen: list[object] = []

    def loop() -> None:
        for batch in devicekit.prefetch(source(), device):
            seen.append(batch)

    with simulated_cuda(), pytest.raises(KeyboardInterrupt):
        loop()
    assert len(seen) == 1


def test_keyboard_interrupt_in_the_loop_body_leaves_no_thread() -> None:
    def loop() -> None:
        for i, _ in enumerate(devicekit.prefetch(batches(10), "cuda")):
            if i == 1:
                raise KeyboardInterrupt

    with simulated_cuda(), pytest.raises(KeyboardInterrupt):
        loop()


def test_keyboard_interrupt_while_waiting_for_a_batch_ends_the_pass() -> None:
    release = threading.Event()

    def slow() -> Iterator[dict[str, torch.Tensor]]:
        yield {"x": torch.ones(2)}
        release.wait(JOIN)  # the loop waits here for the second batch
        yield {"x": torch.ones(2)}

    timer = threading.Timer(0.3, _thread.interrupt_main)
    with simulated_cuda():
        iterator = iter(devicekit.prefetch(slow(), "cuda"))
        next(iterator)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            next(iterator)
        release.set()
        with pytest.raises(StopIteration):
            next(iterator)
        timer.join(JOIN)


# ---------------------------------------------------------------------------------------------
# Static buffers


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_static_buffers_are_refilled_in_place(device: str) -> None:
    source: list[dict[str, Any]] = [
        {
            "x": torch.full((2, 3), float(i)),
            "ids": [torch.full((3,), i), f"row{i}"],
            "big": torch.full((200, 100), float(i)),
            "mask": torch.arange(4) > i,
        }
        for i in range(4)
    ]
    with simulated_cuda(), pytest.MonkeyPatch.context() as patch:
        target = devicekit.as_device(device)
        copies: list[tuple[str, int]] = []
        foreach_copy = torch._foreach_copy_

        def spy(into: list[torch.Tensor], values: list[torch.Tensor]) -> None:
            assert all(t.device == target for t in into)
            copies.append((str(into[0].dtype), len(into)))
            foreach_copy(into, values)

        patch.setattr(torch, "_foreach_copy_", spy)
        prefetched = devicekit.prefetch(source, device, static=True)
        first_x = None
        for number, (batch, want) in enumerate(zip(prefetched, source, strict=True)):
            first_x = batch["x"] if first_x is None else first_x
            assert batch["x"] is first_x  # the very same buffer every step ...
            assert batch["x"].untyped_storage() is not want["x"].untyped_storage()
            assert_same(batch, want, target)  # ... holding this batch's values
            assert batch["ids"][1] == f"row{number}"  # non-tensor values are this batch's
    # One grouped copy per device and dtype and batch: float32 (x, big), int64 and bool.
    per_batch = [("torch.bool", 1), ("torch.float32", 2), ("torch.int64", 1)]
    assert sorted(copies) == sorted(per_batch * 4)


def test_static_refuses_a_changed_shape_naming_its_path() -> None:
    source = [{"x": torch.ones(4, 8)}, {"x": torch.ones(4, 16)}]
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(static=True\): batch\['x'\] of batch 1 is f32\[4,16\] @ cpu, but its "
        r"static buffer \(from batch 0\) is f32\[4,8\] @ cpu\. A captured graph reads the same "
        r"buffers every step: make the loader yield the same structure, shapes and dtypes",
    ):
        list(devicekit.prefetch(source, "cpu", static=True))


def test_static_refuses_a_changed_dtype_under_simulated_cuda() -> None:
    source = [{"x": torch.ones(2)}, {"x": torch.ones(2, dtype=torch.float64)}]
    with (
        simulated_cuda(),
        pytest.raises(
            devicekit.InvalidArgumentError,
            match=r"batch\['x'\] of batch 1 is f64\[2\] @ cuda:0, but its static buffer \(from "
            r"batch 0\) is f32\[2\] @ cuda:0",
        ),
    ):
        list(devicekit.prefetch(source, "cuda", static=True))


def test_static_refuses_a_changed_structure() -> None:
    ones = torch.ones(2)
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(static=True\): batch 1 holds batch\['y'\] where batch 0 held "
        r"batch\['x'\]\. A captured graph",
    ):
        list(devicekit.prefetch([{"x": torch.ones(2)}, {"y": torch.ones(2)}], "cpu", static=True))
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(static=True\): batch 1 holds batch\[1\] \(a tensor\), which batch 0 "
        r"did not have\.",
    ):
        list(devicekit.prefetch([[torch.ones(2)], [torch.ones(2)] * 2], "cpu", static=True))
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(static=True\): batch 2 has no batch\[1\] \(a tensor\), which batch 0 "
        r"had\.",
    ):
        list(devicekit.prefetch([[ones] * 2, [ones] * 2, [ones]], "cpu", static=True))
    with pytest.raises(
        devicekit.InvalidArgumentError,
        match=r"^prefetch\(static=True\): in batch 1, batch is a tuple, but in batch 0 it "
        r"was a list\.",
    ):
        list(devicekit.prefetch([[torch.ones(2)], (torch.ones(2),)], "cpu", static=True))


# ---------------------------------------------------------------------------------------------
# Properties


def run_loader(
    source: list[Any], fail_at: int | None, stop_after: int | None, device: str, depth: int
) -> None:
    """Iterate `prefetch` over `source` (failing at `fail_at`, leaving after `stop_after`
    batches) and check what arrives, in order, and that no thread is left."""
    reads = [0]

    def loader() -> Iterator[Any]:
        for position, batch in enumerate(source):
            if position == fail_at:
                raise Boom(position)
            reads[0] += 1
            yield batch

    target = devicekit.as_device(device)
    received: list[Any] = []
    error: BaseException | None = None
    try:
        for batch in devicekit.prefetch(loader(), device, depth=depth):
            if stop_after is not None and len(received) == stop_after:
                break
            received.append(batch)
    except Boom as raised:
        error = raised
    ends = [len(source)]
    if fail_at is not None:
        ends.append(fail_at)
    if stop_after is not None:
        ends.append(stop_after)
    expected = min(ends)
    assert len(received) == expected
    for got, want in zip(received, source, strict=False):
        assert_same(got, want, target)
    # The loop leaves on receiving batch `stop_after`; a failure at or before it surfaces.
    if (
        fail_at is not None
        and fail_at < len(source)
        and (stop_after is None or fail_at <= stop_after)
    ):
        assert isinstance(error, Boom)
        assert error.args == (fail_at,)
    else:
        assert error is None
    assert reads[0] <= expected + depth + 1  # read ahead by `depth` at most
    gc.collect()
    assert_no_thread_left()


OPTIONAL_POSITION = st.none() | st.integers(0, 6)


@settings(max_examples=60)
@given(
    source=st.lists(nested_batches(max_depth=2), max_size=6),
    fail_at=OPTIONAL_POSITION,
    stop_after=OPTIONAL_POSITION,
    depth=st.integers(1, 4),
)
def test_property_every_batch_once_in_order_on_cpu(
    source: list[Any], fail_at: int | None, stop_after: int | None, depth: int
) -> None:
    run_loader(source, fail_at, stop_after, "cpu", depth)


@settings(max_examples=60)
@given(
    source=st.lists(nested_batches(max_depth=2), max_size=6),
    fail_at=OPTIONAL_POSITION,
    stop_after=OPTIONAL_POSITION,
    depth=st.integers(1, 4),
)
def test_property_every_batch_once_in_order_under_simulated_cuda(
    source: list[Any], fail_at: int | None, stop_after: int | None, depth: int
) -> None:
    # With the race finder: a batch read before its copy is ordered would raise RaceError.
    with simulated_cuda(races=True):
        run_loader(source, fail_at, stop_after, "cuda", depth)


@settings(max_examples=30)
@given(
    source=st.lists(
        st.dictionaries(
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 40_000).map(lambda n: torch.arange(n, dtype=torch.int32)),
            min_size=1,
        ),
        max_size=5,
    ),
    depth=st.integers(1, 4),
    coalesce=st.sampled_from(["auto", True, False]),
    pin=st.booleans(),
)
def test_property_pinning_and_packing_keep_values(
    source: list[dict[str, torch.Tensor]], depth: int, coalesce: Any, pin: bool
) -> None:
    with simulated_cuda():
        moved = list(devicekit.prefetch(source, "cuda", depth=depth, coalesce=coalesce, pin=pin))
        for got, want in zip(moved, source, strict=True):
            assert_same(got, want, torch.device("cuda", 0))


def test_views_keep_sharing_a_storage_when_pinned() -> None:
    base = torch.arange(40_000.0)
    source: list[dict[str, Any]] = [
        {"a": base[:20_000], "b": base[20_000:], "t": types.SimpleNamespace(v=1)}
    ]
    with simulated_cuda():
        [moved] = list(devicekit.prefetch(source, "cuda"))
        assert moved["a"].untyped_storage() is moved["b"].untyped_storage()
        assert_same(moved["a"], base[:20_000], torch.device("cuda", 0))


# ---------------------------------------------------------------------------------------------
# Under the race finder (`simulated_devices(..., races=True)`)


def train(prefetched: Any, *, stream: torch.Stream | None = None) -> list[float]:
    """A loop that computes on every batch on the current stream (or `stream`) and waits for
    the results only at the end: each batch is freed while the loop's kernels may still read it
    (which `record_stream` covers)."""
    results = []
    with stream if stream is not None else contextlib.nullcontext():
        for batch in prefetched:
            results.append((batch["big"] * 2).sum() + batch["x"].sum())
        return [float(y.cpu()) for y in results]


def expected_sums(count: int) -> list[float]:
    return [float(i * 2 * 20_000 + i * 6) for i in range(count)]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("side", [False, True])
def test_the_race_finder_finds_nothing(static: bool, depth: int, side: bool) -> None:
    with simulated_cuda(races=True):
        stream = torch.Stream(device="cuda") if side else None
        prefetched = devicekit.prefetch(batches(5), "cuda", depth=depth, static=static)
        if static:
            prefetched = devicekit.prefetch(
                [{k: v for k, v in b.items() if k != "ids"} for b in batches(5)],
                "cuda",
                depth=depth,
                static=True,
            )
        assert train(prefetched, stream=stream) == expected_sums(5)


def test_the_race_finder_sees_a_missing_wait() -> None:
    # The same loop with the hand-over's wait taken out: the finder must object, or the test
    # above could not fail.
    with simulated_cuda(races=True), pytest.MonkeyPatch.context() as patch:
        stream_type = type(torch.accelerator.current_stream())
        patch.setattr(stream_type, "wait_event", lambda stream, event: None)
        with pytest.raises(devicekit.RaceError):
            train(devicekit.prefetch(batches(3), "cuda"))


def test_the_race_finder_sees_a_missing_record_stream() -> None:
    with simulated_cuda(races=True), pytest.MonkeyPatch.context() as patch:
        loop_stream = torch.Stream(device="cuda")  # a side stream: its reads are recorded
        patch.setattr(
            torch.Tensor,
            "record_stream",
            functools.wraps(torch.Tensor.record_stream)(lambda tensor, stream: None),
        )
        with pytest.raises(devicekit.RaceError):
            train(devicekit.prefetch(batches(4), "cuda"), stream=loop_stream)


# ---------------------------------------------------------------------------------------------
# The benchmark script runs end to end (its GPU section under simulated CUDA, tiny sizes)


def test_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import bench_prefetch

    bench_prefetch.main(["--batches", "8", "--repeat", "1"])
    table = capsys.readouterr().out
    assert "| prefetch(loader, 'cpu') | 64 x 1024 B |" in table.replace("  ", "")
    with simulated_cuda():
        gpu = bench_prefetch.gpu_section(
            torch.device("cuda", 0), nbytes=64 * 64, compute_ms=0.1, steps=3, epochs=2, side=8
        )
    for row in (
        "plain .to() loop",
        "non_blocking=True on the current stream (accelerate)",
        "devicekit.prefetch, depth=2",
        "torchtnt CudaDataPrefetcher (2 ahead)",
        "Reserved memory over 2 epochs of prefetch",
    ):
        assert row in gpu
    assert "GPU section skipped: CUDA is not available" in bench_prefetch.gpu_section()
