"""The race finder: `simulated_devices(..., races=True)`.

The corpus (`benchmarks/race_corpus.py`) holds the races and their fixes; here each buggy
version must raise `RaceError` for its own race, each fixed version must give the values it
gives without the race finder, and devicekit's own transfers must raise nothing.
"""

from __future__ import annotations

import copy
import gc
import io
import re
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from benchmarks import race_corpus
from benchmarks._timing import format_table
from devicekit import _simulate_async, _simulate_mode
from devicekit._errors import InvalidArgumentError, RaceError, SimulationError
from tests.machine import REAL_CUDA

pytest_plugins = ["pytester"]

PATTERNS = {pattern.name: pattern for pattern in race_corpus.PATTERNS}

#: What each buggy version's error says: the racing op, its stream, and the op it races with.
FOUND = {
    "d2h_read_before_sync": r"Tensor\.argmax on the host reads f32\[6\] @ cpu while "
    r"Tensor\.to\(non_blocking=True\) on the default stream of cuda:0",
    "tolist_of_nonblocking_copy": r"Tensor\.tolist on the host reads i64\[4\] @ cpu",
    "numpy_of_nonblocking_copy": r"Tensor\.numpy on the host reads f32\[2,3\] @ cpu",
    "pinned_copy_read_early": r"Tensor\.tolist on the host reads f32\[2\] @ cpu while "
    r"Tensor\.copy_\(non_blocking=True\)",
    "mps_nonblocking_host_copy": r"on the host reads f32\[5\] @ cpu while "
    r"Tensor\.to\(non_blocking=True\) on the default stream of mps:0",
    "prefetcher_without_wait_stream": r"Tensor\.mul on the default stream of cuda:0 reads "
    r"f32\[4\] @ cuda:0 while Tensor\.cuda\(non_blocking=True\) on the side stream \d+ of cuda:0",
    "prefetcher_without_record_stream": r"f32\[4\] @ cuda:0 was freed while the default stream "
    r"of cuda:0 may still use it \(Tensor\.mul, called from .*race_corpus\.py:\d+: total \+= "
    r"\(batch \* 2\)\.sum\(\)\)\. It was allocated on the side stream \d+ of cuda:0, whose "
    r"next allocation may reuse the memory before that use is done\. Fix: call "
    r"tensor\.record_stream\(torch\.cuda\.current_stream\(\)\) where the default stream of "
    r"cuda:0 uses it, or keep the tensor alive until side_stream\.wait_stream\(torch\.cuda\."
    r"current_stream\(\)\) or a synchronize\.",
    "staging_buffer_reused_early": r"Tensor\.copy_ on the host writes f32\[4\] @ cpu while "
    r"Tensor\.to\(non_blocking=True\) on the default stream of cuda:0 may still be reading it",
    "event_on_wrong_stream": r"Tensor\.mean on the default stream of cuda:0 reads f32\[3\] "
    r"@ cuda:0 while Tensor\.to\(non_blocking=True\) on the side stream",
    "side_compute_without_wait": r"on the default stream of cuda:0 reads f32\[4\] @ cuda:0 "
    r"while Tensor\.matmul on the side stream",
    "side_copy_read_by_default": r"Tensor\.square on the default stream of cuda:0 reads "
    r"f32\[4\] @ cuda:0 while Tensor\.copy_\(non_blocking=True\) on the side stream",
    "offload_without_wait_stream": r"Tensor\.copy_ on the side stream \d+ of cuda:0 reads "
    r"f32\[4\] @ cuda:0 while Tensor\.exp on the default stream of cuda:0 may still be writing "
    r"it\.\n  this op: .*host\.copy_\(activations, non_blocking=True\)\n  Tensor\.exp: .*"
    r"race_corpus\.py:\d+: activations = torch\.arange\(4\.0, device=\"cuda\"\)\.exp\(\)",
    "double_buffering_one_event": r"Tensor\.copy_ on the side stream \d+ of cuda:0 writes "
    r"f32\[4\] @ cuda:0 while Tensor\.sum on the default stream of cuda:0 may still be reading"
    r".*this may overwrite the bytes before the other op has read them\. Fix: make the side "
    r"stream \d+ of cuda:0 wait for that op first: side_stream\.wait_stream\(torch\.cuda\."
    r"current_stream\(\)\)",
}


def test_the_corpus_has_at_least_ten_patterns_each_with_its_expected_finding() -> None:
    assert len(PATTERNS) >= 10
    assert set(FOUND) == set(PATTERNS)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_each_buggy_version_raises_for_its_race(name: str) -> None:
    pattern = PATTERNS[name]
    expected = race_corpus.run(pattern, pattern.fixed, races=False).values
    unchecked = race_corpus.run(pattern, pattern.buggy, races=False)
    assert unchecked.values == expected  # on the CPU the race cannot show by itself
    found = race_corpus.run(pattern, pattern.buggy, races=True)
    assert found.error is not None, f"{name}: not found, gave {found.values}"
    assert isinstance(found.error, SimulationError)
    assert isinstance(found.error, RuntimeError)
    message = str(found.error)
    assert message.startswith("Race: ")
    assert "races=True" in message
    assert re.search(FOUND[name], message, flags=re.DOTALL), message


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_each_fixed_version_raises_nothing_and_gives_the_same_values(name: str) -> None:
    pattern = PATTERNS[name]
    expected = race_corpus.run(pattern, pattern.fixed, races=False)
    checked = race_corpus.run(pattern, pattern.fixed, races=True)
    assert checked.error is None, str(checked.error)
    assert checked.values == expected.values


def test_the_corpus_table_says_every_race_is_found_with_no_false_alarm() -> None:
    headers, rows = race_corpus.table()
    assert headers == ["#", "pattern", "buggy version", "fixed version"]
    assert [row[2] for row in rows] == ["found (RaceError)"] * len(rows)
    assert [row[3] for row in rows] == ["ok"] * len(rows)


def test_the_docs_show_the_corpus_table_the_script_prints() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "race-finder.md"
    assert format_table(*race_corpus.table()) in page.read_text(encoding="utf-8")


# --- the model, piece by piece -----------------------------------------------------------------


def _escaping_read(tensor: torch.Tensor) -> torch.Tensor:
    """What code that reads past the race finder (C++ extensions, other libraries) sees."""
    with torch._C.DisableTorchFunction():
        return tensor.clone()


@pytest.mark.parametrize(
    ("dtype", "poison"),
    [
        (torch.float32, float("nan")),
        (torch.float16, float("nan")),
        (torch.bfloat16, float("nan")),
        (torch.float64, float("nan")),
        (torch.complex64, complex("nan+nanj")),
        (torch.int64, -(2**63)),
        (torch.int32, -(2**31)),
        (torch.int8, -128),
        (torch.uint8, 255),
        (torch.bool, True),
    ],
)
def test_an_unlanded_copy_to_the_host_holds_poison(dtype: torch.dtype, poison: object) -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        source = torch.zeros(3, dtype=dtype, device="cuda")
        host = source.to("cpu", non_blocking=True)
        seen = _escaping_read(host)
        if isinstance(poison, (float, complex)):
            assert bool(torch.isnan(seen).all())
        else:
            assert seen.tolist() == [poison] * 3
        torch.cuda.synchronize()
        assert torch.equal(host, torch.zeros(3, dtype=dtype))


def _sync_device() -> None:
    torch.cuda.synchronize()


def _sync_accelerator() -> None:
    torch.accelerator.synchronize()


def _sync_stream() -> None:
    torch.cuda.current_stream().synchronize()


def _query_stream() -> None:
    assert torch.cuda.current_stream().query()


def _sync_event() -> None:
    event = torch.cuda.Event()
    event.record()
    event.synchronize()


def _query_event() -> None:
    event = torch.cuda.current_stream().record_event()
    assert event.query()


def _item_on_the_stream() -> None:
    torch.ones((), device="cuda").item()  # waits for the current stream, the copy's


def _blocking_copy_on_the_stream() -> None:
    torch.ones(2, device="cuda").cpu()


HOST_WAITS: dict[str, Callable[[], None]] = {
    "torch.cuda.synchronize": _sync_device,
    "torch.accelerator.synchronize": _sync_accelerator,
    "stream.synchronize": _sync_stream,
    "stream.query": _query_stream,
    "event.synchronize": _sync_event,
    "event.query": _query_event,
    ".item() on the copying stream": _item_on_the_stream,
    "a blocking copy on the copying stream": _blocking_copy_on_the_stream,
}


@pytest.mark.parametrize("wait", sorted(HOST_WAITS))
def test_every_host_wait_lands_a_copy_to_the_host(wait: str) -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        host = torch.arange(4.0, device="cuda").to("cpu", non_blocking=True)
        assert host.is_pinned()  # as torch pins what a non_blocking copy to the host makes
        HOST_WAITS[wait]()
        assert host.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_wait_on_another_stream_does_not_land_a_copy_to_the_host() -> None:
    with devicekit.simulated_devices("cuda", 2, races=True):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            host = torch.arange(3.0, device="cuda").to("cpu", non_blocking=True)
        torch.cuda.current_stream().synchronize()  # not the copying stream
        torch.cuda.synchronize(1)  # not the copying device
        with pytest.raises(RaceError, match=r"Tensor\.sum on the host reads f32\[3\] @ cpu"):
            host.sum()
        side.synchronize()
        assert host.sum().item() == 3.0


def _wait_stream(side: torch.Stream) -> None:
    torch.cuda.current_stream().wait_stream(side)


def _wait_event(side: torch.Stream) -> None:
    torch.cuda.current_stream().wait_event(side.record_event())


def _event_wait(side: torch.Stream) -> None:
    event = torch.cuda.Event()
    event.record(side)
    event.wait()


def _host_waits_for_side(side: torch.Stream) -> None:
    side.synchronize()


ORDERINGS: dict[str, Callable[[torch.Stream], None]] = {
    "current_stream().wait_stream(side)": _wait_stream,
    "current_stream().wait_event(side.record_event())": _wait_event,
    "event.record(side); event.wait()": _event_wait,
    "side.synchronize()": _host_waits_for_side,
}


@pytest.mark.parametrize("order", sorted(ORDERINGS))
def test_an_ordered_stream_reads_a_side_stream_copy(order: str) -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        source = torch.arange(4.0).pin_memory()
        with torch.cuda.stream(side):
            batch = source.to("cuda", non_blocking=True)
            assert batch.sum().item() == 6.0  # the copying stream itself is ordered after it
        ORDERINGS[order](side)
        assert (batch * 2).tolist() == [0.0, 2.0, 4.0, 6.0]


def _no_wait(side: torch.Stream) -> None:
    pass


def _host_waits_for_default(side: torch.Stream) -> None:
    torch.ones((), device="cuda").item()


def _side_waits_for_default(side: torch.Stream) -> None:
    side.wait_stream(torch.cuda.current_stream())


@pytest.mark.parametrize(
    ("wait", "raced"),
    [(_no_wait, True), (_host_waits_for_default, False), (_side_waits_for_default, False)],
)
def test_a_side_stream_reading_what_the_default_stream_wrote_must_wait_for_it(
    wait: Callable[[torch.Stream], None], raced: bool
) -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        weights = torch.ones(3, 3, device="cuda") * 2  # written on the default stream
        rows = weights.unbind(0)  # views hold what their base holds
        same = weights.contiguous()  # hands `weights` back: nothing new written
        wait(side)
        with torch.cuda.stream(side):
            if raced:
                with pytest.raises(
                    RaceError,
                    match=r"Tensor\.sum on the side stream \d+ of cuda:0 reads f32\[3\] @ "
                    r"cuda:0 while Tensor\.mul on the default stream of cuda:0 may still be "
                    r"writing it\.\n  this op: .*\n  Tensor\.mul: .*weights = torch\.ones",
                ):
                    rows[1].sum()
            else:
                assert float(rows[1].sum() + same.sum()) == 24.0


@pytest.mark.parametrize("spelling", ["to", "copy_"])
def test_a_copy_between_devices_orders_the_destination_stream_after_it(spelling: str) -> None:
    with devicekit.simulated_devices("cuda", 2, races=True):
        side = torch.cuda.Stream(device=0)  # side streams exist: every op is recorded
        source = torch.ones(3, device="cuda:1") * 2  # written on cuda:1's default stream
        with torch.cuda.stream(side):  # cuda:0's current stream is `side` here
            if spelling == "to":
                copied = source.to("cuda:0", non_blocking=True)
            else:
                copied = torch.empty(3, device="cuda:0").copy_(source, non_blocking=True)
            total = copied.sum()  # `side` waits for the copy, as torch makes it
        with pytest.raises(RaceError, match=r"on the default stream of cuda:0 reads f32\[3\]"):
            copied.sum()  # ... but cuda:0's default stream does not
        torch.cuda.current_stream(0).wait_stream(side)
        assert (copied.sum() + total).item() == 12.0


def test_a_race_names_both_ops_their_streams_and_call_sites() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            batch = torch.ones(2, 3).pin_memory().to("cuda", non_blocking=True)
        with pytest.raises(RaceError) as caught:
            batch.sum()
    error = caught.value
    message = str(error)
    assert message.splitlines()[0] == (
        f"Race: Tensor.sum on the default stream of cuda:0 reads f32[2,3] @ cuda:0 while "
        f"Tensor.to(non_blocking=True) on the side stream {side.stream_id} of cuda:0 may "
        "still be writing it."
    )
    assert "  this op: " in message
    assert "batch.sum()" in message
    assert "Tensor.to(non_blocking=True): " in message
    assert ".pin_memory().to(" in message
    assert message.splitlines()[3] == (
        "On a GPU this may read the bytes before they are written (garbage). Fix: make the "
        "default stream of cuda:0 wait for that op first: torch.cuda.current_stream()"
        ".wait_stream(side_stream), or torch.cuda.current_stream().wait_event(event) with the "
        f"event recorded on the side stream {side.stream_id} of cuda:0 after that op."
    )
    assert error.op == "Tensor.sum"
    assert error.stream == "the default stream of cuda:0"
    assert (
        error.other == f"Tensor.to(non_blocking=True) on the side stream {side.stream_id} of cuda:0"
    )
    assert error.location is not None
    assert "test_simulate_races.py" in error.location


def test_a_read_on_the_copying_stream_sees_real_values() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        batch = torch.arange(5).pin_memory().to("cuda", non_blocking=True)
        assert _escaping_read(batch).tolist() == [-(2**63)] * 5  # not landed yet
        assert (batch + 1).tolist() == [1, 2, 3, 4, 5]  # the same stream: it has landed
        assert _escaping_read(batch).tolist() == [0, 1, 2, 3, 4]


COPY_SPELLINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "to(device, non_blocking=True)": lambda t: t.to("cuda", non_blocking=True),
    "to(device, dtype, True)": lambda t: t.to("cuda", torch.float32, True),
    "to(other, non_blocking=True)": lambda t: t.to(torch.ones(1, device="cuda"), non_blocking=True),
    "cuda(non_blocking=True)": lambda t: t.cuda(non_blocking=True),
    "cuda(0, True)": lambda t: t.cuda(0, True),
    "copy_(t, non_blocking=True)": lambda t: torch.empty(3, device="cuda").copy_(
        t, non_blocking=True
    ),
    "copy_(t, True)": lambda t: torch.empty(3, device="cuda").copy_(t, True),
}


@pytest.mark.parametrize("spelling", sorted(COPY_SPELLINGS))
def test_every_spelling_of_a_non_blocking_copy_is_asynchronous(spelling: str) -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            moved = COPY_SPELLINGS[spelling](torch.arange(3.0).pin_memory())
        assert bool(torch.isnan(_escaping_read(moved)).all())  # not landed yet
        with pytest.raises(RaceError, match=r"on the default stream of cuda:0 reads f32\[3\]"):
            moved.sum()
        torch.cuda.current_stream().wait_stream(side)
        assert moved.tolist() == [0.0, 1.0, 2.0]


def test_a_blocking_copy_or_one_between_devices_holds_no_poison() -> None:
    with devicekit.simulated_devices("cuda", 2, races=True):
        on_device = torch.arange(3.0).to("cuda")
        assert _escaping_read(on_device).tolist() == [0.0, 1.0, 2.0]
        other = on_device.to("cuda:1", non_blocking=True)  # ordered on the streams: no poison
        assert _escaping_read(other).tolist() == [0.0, 1.0, 2.0]
        assert other.tolist() == [0.0, 1.0, 2.0]


def test_gradients_flow_through_non_blocking_copies() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        weights = torch.ones(3, requires_grad=True)
        on_device = weights.to("cuda", non_blocking=True)  # poisoned, then landed: no autograd
        (on_device * 2).sum().backward()
        back = (weights.to("cuda") * 3).to("cpu", non_blocking=True)
        torch.cuda.synchronize()
        back.sum().backward()
    assert weights.grad is not None
    assert weights.grad.tolist() == [5.0, 5.0, 5.0]


def test_a_view_of_an_unlanded_copy_is_checked_as_the_copy() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        host = torch.arange(6.0, device="cuda").to("cpu", non_blocking=True)
        row = host.view(2, 3)[1]  # making views reads nothing
        with pytest.raises(RaceError, match=r"Tensor\.tolist on the host reads f32\[3\] @ cpu"):
            row.tolist()


def test_disjoint_parts_of_one_buffer_do_not_race() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        ring = torch.zeros(2, 3, device="cuda")
        torch.cuda.synchronize()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ring[1].copy_(torch.ones(3).pin_memory(), non_blocking=True)
        assert ring[0].sum().item() == 0.0  # the other slot: no race
        with pytest.raises(RaceError, match=r"Tensor\.sum on the default stream"):
            ring[1].sum()


def test_a_pinned_source_is_read_when_the_copy_lands() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        source = torch.ones(3).pin_memory()
        batch = source.to("cuda", non_blocking=True)
        source.numpy()[:] = 5.0  # a write the race finder cannot see: it lands in `batch`
        assert batch.tolist() == [5.0, 5.0, 5.0]


def test_a_pageable_source_is_staged_at_once() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        source = torch.ones(3)
        batch = source.to("cuda", non_blocking=True)
        source.fill_(5.0)  # CUDA copies pageable memory to its own staging first: no race
        assert batch.tolist() == [1.0, 1.0, 1.0]


def test_copy_to_pageable_host_memory_is_synchronous() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        host = torch.empty(3)
        host.copy_(torch.ones(3, device="cuda"), non_blocking=True)
        assert host.tolist() == [1.0, 1.0, 1.0]


def _side_tensor(side: torch.Stream) -> torch.Tensor:
    with torch.cuda.stream(side):
        return torch.ones(4, device="cuda") * 3


def test_freeing_memory_another_stream_may_still_read_raises_at_the_next_op() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        batch = _side_tensor(side)
        torch.cuda.current_stream().wait_stream(side)
        total = batch.sum()
        del batch  # allocated on `side`, still read by the default stream
        with pytest.raises(
            RaceError,
            match=r"Race: f32\[4\] @ cuda:0 was freed while the "
            r"default stream of cuda:0 may still use it \(Tensor\.sum",
        ):
            total + 1


def _record_stream(batch: torch.Tensor, side: torch.Stream) -> None:
    batch.record_stream(torch.cuda.current_stream())


def _host_sync(batch: torch.Tensor, side: torch.Stream) -> None:
    torch.cuda.synchronize()


def _allocating_stream_waits(batch: torch.Tensor, side: torch.Stream) -> None:
    side.wait_stream(torch.cuda.current_stream())


FREE_SAFELY: dict[str, Callable[[torch.Tensor, torch.Stream], None]] = {
    "record_stream": _record_stream,
    "host synchronize": _host_sync,
    "allocating stream waits": _allocating_stream_waits,
}


@pytest.mark.parametrize("way", sorted(FREE_SAFELY))
def test_freeing_after_record_stream_or_a_wait_is_safe(way: str) -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        batch = _side_tensor(side)
        torch.cuda.current_stream().wait_stream(side)
        total = batch.sum()
        FREE_SAFELY[way](batch, side)
        del batch
        assert (total + 1).item() == 13.0


def test_an_unsafe_free_as_the_block_ends_raises_at_its_end() -> None:
    def free_last() -> None:
        side = torch.cuda.Stream()
        batch = _side_tensor(side)
        torch.cuda.current_stream().wait_stream(side)
        batch.sum()
        del batch  # no op after it in the block

    with pytest.raises(RaceError, match=r"f32\[4\] @ cuda:0 was freed while the default"):
        devicekit.simulated_devices("cuda", 1, races=True)(free_last)()


def test_copies_land_when_the_block_ends() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            on_device = torch.arange(3.0).pin_memory().to("cuda", non_blocking=True)
        host = torch.arange(3.0, device="cuda").to("cpu", non_blocking=True)
    assert on_device.tolist() == [0.0, 1.0, 2.0]  # plain CPU tensors now, with their values
    assert host.tolist() == [0.0, 1.0, 2.0]


def test_what_is_known_of_memory_is_forgotten_when_it_is_freed() -> None:
    # The CPU allocator hands freed addresses on at once: a record left behind would make the
    # next tensor at that address race with work done on the freed one.
    with devicekit.simulated_devices("cuda", 1, races=True):
        races = _simulate_async.active
        assert races is not None
        side = torch.cuda.Stream()
        source = torch.ones(64).pin_memory()
        key = source.untyped_storage().data_ptr()
        with torch.cuda.stream(side):
            batch = source.to("cuda", non_blocking=True)
            batch.sum()  # lands the copy; the side stream's read of `source` stays recorded
        assert key in races.storages
        del source
        assert key not in races.storages


def test_an_unlanded_copy_keeps_no_tensor_alive() -> None:

    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            on_device = torch.ones(8).pin_memory().to("cuda", non_blocking=True)
            on_host = torch.ones(8, device="cuda").to("cpu", non_blocking=True)
        refs = [weakref.ref(on_device), weakref.ref(on_host)]
        del on_device, on_host  # never read: a GPU frees them, and so does the race finder
        gc.collect()
        assert [ref() for ref in refs] == [None, None]
        torch.cuda.synchronize()  # nothing left to land


def test_tensors_deep_copy_and_save_as_usual_while_side_streams_exist() -> None:

    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        model = torch.nn.Linear(3, 2).to("cuda")
        model(torch.ones(1, 3, device="cuda")).sum().backward()  # default-stream writes
        twin = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            assert torch.equal(twin.weight, model.weight)
    assert set(vars(model.weight)) <= {"_devicekit_simulated_device"}


def test_ops_stop_recording_once_the_side_streams_are_gone() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        races = _simulate_async.active
        assert races is not None
        torch.ones(2, device="cuda") * 2
        assert races.side_streams == 0
        assert not races.storages  # no side stream: nothing to record
        side = torch.cuda.Stream()
        kept = torch.ones(2, device="cuda") * 2
        assert races.side_streams == 1
        assert races.storages  # recorded while a side stream exists
        torch.cuda.synchronize()
        del side, kept
        gc.collect()
        assert races.side_streams == 0
        torch.ones(2, device="cuda") * 2
        assert not races.storages


def test_record_stream_is_accepted_for_host_streams_and_tensors_never_seen() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        torch.ones(2, device="cuda").record_stream(torch.cuda.current_stream())


def test_streams_are_per_thread_and_a_worker_copy_needs_an_event() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        ready = torch.cuda.Event()
        made: list[torch.Tensor] = []

        def worker(record: bool) -> None:
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                made.append(torch.arange(3.0).pin_memory().to("cuda", non_blocking=True))
                if record:
                    ready.record(side)

        thread = threading.Thread(target=worker, args=(True,))
        thread.start()
        thread.join()
        torch.cuda.current_stream().wait_event(ready)
        assert made.pop().tolist() == [0.0, 1.0, 2.0]
        thread = threading.Thread(target=worker, args=(False,))
        thread.start()
        thread.join()
        with pytest.raises(RaceError, match=r"Tensor\.tolist on the default stream of cuda:0"):
            made.pop().tolist()


# --- devicekit's own transfers raise nothing --------------------------------------------------


@pytest.mark.parametrize("non_blocking", ["auto", True, False])
@pytest.mark.parametrize("coalesce", ["auto", True, False])
def test_to_device_and_coalesced_transfers_raise_nothing(
    non_blocking: bool | str, coalesce: bool | str
) -> None:
    batch = {
        "x": torch.randn(8, 4),
        "y": torch.arange(8),
        "small": [torch.full((3,), float(i)) for i in range(12)],
    }
    with devicekit.simulated_devices("cuda", 2, races=True):
        for source in (batch, devicekit.to_device(batch, "cpu")):
            pinned = {
                "x": source["x"].pin_memory(),
                "y": source["y"].pin_memory(),
                "small": [t.pin_memory() for t in source["small"]],
            }
            for inputs in (source, pinned):
                moved = devicekit.to_device(
                    inputs, "cuda:1", non_blocking=non_blocking, coalesce=coalesce
                )  # type: ignore[arg-type]
                total = moved["x"].sum() + moved["y"].sum() + sum(t.sum() for t in moved["small"])
                back = devicekit.to_device(
                    moved, "cpu", non_blocking=non_blocking, coalesce=coalesce
                )  # type: ignore[arg-type]
                assert torch.equal(back["x"], batch["x"])
                assert torch.equal(back["y"], batch["y"])
                assert all(
                    torch.equal(a, b) for a, b in zip(back["small"], batch["small"], strict=True)
                )
                assert total.item() == pytest.approx(
                    float(batch["x"].sum() + batch["y"].sum() + 3 * sum(range(12))), rel=1e-5
                )


def test_to_device_on_a_side_stream_is_checked_like_any_copy() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        batch = [torch.ones(3).pin_memory() for _ in range(4)]
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            moved = devicekit.to_device(batch, "cuda", non_blocking=True)
        with pytest.raises(RaceError, match="on the default stream of cuda:0 reads f32"):
            moved[0].sum()
        torch.cuda.current_stream().wait_stream(side)
        assert sum(t.sum() for t in moved).item() == 12.0


def test_module_to_non_blocking_and_a_pinned_data_loader_raise_nothing() -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    with devicekit.simulated_devices("cuda", 1, races=True):
        model = torch.nn.Linear(4, 1).to("cuda", non_blocking=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for inputs, targets in torch.utils.data.DataLoader(data, batch_size=4, pin_memory=True):
            inputs, targets = devicekit.to_device((inputs, targets), "cuda", non_blocking=True)
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(losses) == 4
    assert all(loss == loss for loss in losses)


# --- the option ---------------------------------------------------------------------------------


def test_races_are_off_by_default_at_no_cost() -> None:
    with devicekit.simulated_devices("cuda", 1):
        session = _simulate_mode._active
        assert session is not None
        assert type(session.mode) is _simulate_mode._SimulationMode
        assert _simulate_async.active is None
        host = torch.arange(3.0, device="cuda").to("cpu", non_blocking=True)
        assert host.tolist() == [0.0, 1.0, 2.0]
    with devicekit.simulated_devices("cuda", 1, races=True):
        session = _simulate_mode._active
        assert session is not None
        assert type(session.mode) is _simulate_async.RacingMode
        assert _simulate_async.active is not None
    assert _simulate_async.active is None


def test_races_must_be_a_bool() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        devicekit.simulated_devices("cuda", 2, races="yes")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "simulated_devices('cuda', 2, races='yes'): races must be True or False, got 'yes'."
    )


def test_repr_and_decorator_keep_races() -> None:
    simulation = devicekit.simulated_devices("cuda", 1, races=True)
    assert repr(simulation) == "simulated_devices('cuda', 1, races=True)"
    assert repr(devicekit.simulated_devices("cuda", 1)) == "simulated_devices('cuda', 1)"

    @simulation
    def read_early() -> list[float]:
        return torch.ones(2, device="cuda").to("cpu", non_blocking=True).tolist()

    with pytest.raises(RaceError):
        read_early()


def test_a_plain_block_inside_a_racing_one_joins_it() -> None:
    with devicekit.simulated_devices("cuda", 1, races=True):
        races = _simulate_async.active
        with devicekit.simulated_devices("cuda", 1):
            assert _simulate_async.active is races
            with pytest.raises(RaceError):
                torch.ones(2, device="cuda").to("cpu", non_blocking=True).tolist()
        assert _simulate_async.active is races


def test_a_racing_block_inside_a_plain_one_is_its_own_simulation() -> None:
    with devicekit.simulated_devices("cuda", 1):
        with devicekit.simulated_devices("cuda", 1, races=True):
            assert _simulate_async.active is not None
            with pytest.raises(RaceError):
                torch.ones(2, device="cuda").to("cpu", non_blocking=True).tolist()
        assert _simulate_async.active is None
        assert torch.ones(2, device="cuda").to("cpu", non_blocking=True).tolist() == [1.0, 1.0]


# --- properties ---------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool]


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    wait=st.sampled_from(sorted(HOST_WAITS)),
    order=st.sampled_from(sorted(ORDERINGS)),
    seed=st.integers(0, 2**16),
)
def test_correctly_ordered_copies_never_raise_and_keep_every_value(
    shapes: list[list[int]], dtype: torch.dtype, wait: str, order: str, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    batches = [
        (torch.rand(shape, generator=generator) * 100).to(dtype) for shape in map(tuple, shapes)
    ]
    with devicekit.simulated_devices("cuda", 1, races=True):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            on_device = [batch.pin_memory().to("cuda", non_blocking=True) for batch in batches]
        ORDERINGS[order](side)
        doubled = [t.clone() for t in on_device]  # the default stream reads each
        back = [t.to("cpu", non_blocking=True) for t in doubled]
        HOST_WAITS[wait]()
        for batch, host in zip(batches, back, strict=True):
            assert torch.equal(host, batch)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    read=st.sampled_from(["tolist", "sum", "clone", "numpy", "eq", "index"]),
)
def test_any_host_read_of_an_unlanded_copy_raises(
    shape: list[int], dtype: torch.dtype, read: str
) -> None:
    reads: dict[str, Callable[[torch.Tensor], object]] = {
        "tolist": torch.Tensor.tolist,
        "sum": torch.Tensor.sum,
        "clone": torch.Tensor.clone,
        "numpy": torch.Tensor.numpy,
        "eq": lambda t: t == t,
        "index": lambda t: t.reshape(-1)[torch.tensor([0])],
    }
    with devicekit.simulated_devices("cuda", 1, races=True):
        host = torch.ones(shape, dtype=dtype, device="cuda").to("cpu", non_blocking=True)
        with pytest.raises(RaceError, match="on the host reads"):
            reads[read](host)


# --- the pytest option --------------------------------------------------------------------------

EARLY_READ = """
    import pytest
    import torch


    def test_read_early():
        host = torch.arange(3.0, device="cuda").to("cpu", non_blocking=True)
        assert host.tolist() == [0.0, 1.0, 2.0]


    @pytest.mark.simulated_devices("cuda", 1)
    def test_read_early_under_a_marker():
        host = torch.arange(3.0, device="cuda").to("cpu", non_blocking=True)
        assert host.tolist() == [0.0, 1.0, 2.0]
"""


def _run_pytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    from tests.test_pytest_plugin import run

    return run(pytester, *args)


@pytest.mark.skipif(REAL_CUDA, reason="simulates CUDA")
def test_the_races_option_turns_the_race_finder_on_for_run_wide_and_marker_simulations(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_early=EARLY_READ)
    _run_pytest(pytester, "--devicekit-simulate=cuda:1").assert_outcomes(passed=2)
    result = _run_pytest(pytester, "--devicekit-simulate=cuda:1", "--devicekit-races")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*RaceError: Race: Tensor.tolist on the host reads f32[[]3[]] @ cpu while*"]
    )
    assert "simulations find stream races (races=True)" in result.stdout.str()
    pytester.makeini("[pytest]\ndevicekit_races = true\n")
    result = _run_pytest(pytester, "-k", "marker")  # a simulation entered by a marker
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RaceError: Race: Tensor.tolist on the host reads*"])


def test_the_stream_module_imports_first_without_a_cycle() -> None:

    for module in ("_simulate_streams", "_simulate_async"):
        done = subprocess.run(
            [sys.executable, "-c", f"import devicekit.{module}"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def test_the_cost_table_is_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import _timing

    monkeypatch.setattr(_timing, "BATCH_S", 1e-4)
    headers, rows = race_corpus.cost(rounds=1)
    assert headers[0] == "simulated code"
    assert [row[0] for row in rows] == ["a + b, 64 elements", "SGD step, 2-layer MLP"]
    for row in rows:
        off, idle, busy = float(row[1]), float(row[2]), float(row[4])
        for shown, value in ((row[3], idle), (row[5], busy)):
            ratio = value / off  # within what rounding the cells to 0.1 us allows
            slack = ratio * (0.05 / off + 0.05 / value) + 0.005
            assert float(shown.rstrip("x")) == pytest.approx(ratio, abs=slack)


# --- devicekit.prefetch under the race finder ---------------------------------------------------


def _prefetch() -> Callable[..., Any]:
    try:
        from devicekit._prefetch import prefetch
    except ImportError:  # pragma: no cover - prefetch lands separately
        pytest.skip("devicekit.prefetch is not there")
    return prefetch


def _batches(count: int = 5) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "x": torch.randn(4, 8, generator=generator),
            "y": torch.arange(4) + step,
            "small": [torch.full((3,), float(step)) for _ in range(6)],
        }
        for step in range(count)
    ]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("coalesce", ["auto", True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_raises_nothing_and_hands_over_every_batch(
    depth: int, coalesce: bool | str, static: bool
) -> None:
    prefetch = _prefetch()
    batches = _batches()
    with devicekit.simulated_devices("cuda", 1, races=True):
        total = torch.zeros((), device="cuda")  # no host wait per step: races would show
        seen = []
        for _ in range(2):
            loop = prefetch(batches, "cuda", depth=depth, coalesce=coalesce, static=static)
            for batch in loop:
                total += batch["x"].sum() + batch["small"][0].sum()
                seen.append(batch["y"] + 0)  # kept on the device: no host wait per step
        for step, _batch in enumerate(prefetch(batches, "cuda", depth=depth)):
            if step == 2:
                break  # an early exit
        expected = sum(float(b["x"].sum()) + 3 * float(b["small"][0][0]) for b in batches)
        assert total.item() == pytest.approx(2 * expected, rel=1e-5)
        seen_values = [t.tolist() for t in seen]
    assert seen_values == [b["y"].tolist() for b in batches] * 2


def _sum_all(batches: Any) -> torch.Tensor:
    """A loop with no host wait per step, so that a race is not hidden by one."""
    total = torch.zeros((), device="cuda")
    for batch in batches:
        total += batch.sum()
    return total


def test_prefetch_without_its_wait_or_record_stream_would_be_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from devicekit import _simulate_streams

    prefetch = _prefetch()
    batches = [torch.ones(4, 8) * step for step in range(4)]
    with monkeypatch.context() as patched:  # a prefetcher whose consumer does not wait
        patched.setattr(_simulate_streams.SimulatedStream, "wait_event", lambda self, e: None)
        with (
            devicekit.simulated_devices("cuda", 1, races=True),
            pytest.raises(RaceError, match=r"on the default stream of cuda:0 reads"),
        ):
            _sum_all(prefetch(batches, "cuda"))
    with monkeypatch.context() as patched:  # ... or that does not tie memory to the consumer
        patched.setattr(_simulate_async.Races, "record_stream", lambda self, t, s: None)
        with (
            devicekit.simulated_devices("cuda", 1, races=True),
            pytest.raises(RaceError, match=r"was freed while the default stream"),
        ):
            _sum_all(prefetch(batches, "cuda"))


class _Failed(Exception):
    pass


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=0, max_size=6),
    fail_at=st.none() | st.integers(0, 6),
    stop_at=st.none() | st.integers(0, 6),
    depth=st.integers(1, 3),
    static=st.booleans(),
)
def test_prefetch_under_the_race_finder_hands_over_each_batch_once_in_order(
    sizes: list[int], fail_at: int | None, stop_at: int | None, depth: int, static: bool
) -> None:
    prefetch = _prefetch()
    if static:
        sizes = [3] * len(sizes)  # static buffers take batches of one layout
    source = [torch.arange(float(size)) + 10 * step for step, size in enumerate(sizes)]

    def loader() -> Any:
        for step, batch in enumerate(source):
            if step == fail_at:
                raise _Failed(step)
            yield {"x": batch, "step": torch.tensor(step)}

    received: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    failed = False
    with devicekit.simulated_devices("cuda", 1, races=True):
        total = torch.zeros((), device="cuda")
        try:
            for step, batch in enumerate(prefetch(loader(), "cuda", depth=depth, static=static)):
                if step == stop_at:
                    break
                total += batch["x"].sum()  # read on the loop's stream, no host wait
                received.append(batch["x"].clone())
                steps.append(batch["step"].clone())
        except _Failed:
            failed = True
        total_read = total.item()
        received = [t.cpu() for t in received]
        assert [int(t) for t in steps] == list(range(len(steps)))
    ends = [len(source)] + [at for at in (fail_at, stop_at) if at is not None]
    expected = source[: min(ends)]
    assert len(received) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(received, expected, strict=True))
    assert total_read == pytest.approx(float(sum(b.sum() for b in expected)))
    # Stopping at step k needs batch k, which the loader yields only when it fails later.
    stopped_first = stop_at is not None and (fail_at is None or stop_at < fail_at)
    assert failed == (fail_at is not None and fail_at < len(source) and not stopped_first)
