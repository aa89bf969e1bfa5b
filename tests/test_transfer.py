"""Coalesced transfers give what per-tensor `.to()` gives, exercised on `cpu` and `meta`.

Without an accelerator, `_emulating` runs the coalesced path from `cpu` to `cpu` as if one side were
an accelerator (the "copy" is a `clone()`), so the packing and unpacking are checked bit for bit;
`cpu -> meta` with `coalesce=True` checks shapes, strides and dtypes through a real dispatch.
"""

from __future__ import annotations

import ast
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import _transfer
from devicekit._transfer import COALESCE_MAX_BYTES, TransferRequest, copy_mode, transfer_tensors

CPU = torch.device("cpu")
META = torch.device("meta")
MODES: tuple[Literal["to_accelerator", "to_host"], ...] = ("to_accelerator", "to_host")
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as bytes, so that NaN payloads and signed zeros count."""
    if tensor.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    plain = torch.empty(tensor.shape, dtype=tensor.dtype)
    plain.copy_(tensor.detach().resolve_conj().resolve_neg())
    return plain.view(-1).view(torch.uint8)


def random_tensor(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """One tensor: any dtype, 0-3 dims, sizes 0-4, contiguous or one of torch's odd layouts."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    base = random_tensor(draw, dtype, shape)
    layout = draw(
        st.sampled_from(["contiguous", "transposed", "sliced", "odd-strides", "conj", "grad"])
    )
    if layout == "transposed" and base.dim() >= 2:
        return base.transpose(0, 1)
    if layout == "sliced" and base.dim() >= 1:
        return base[::2]
    if layout == "odd-strides" and base.dim() >= 1:  # a size-1 dim with a stride torch keeps
        return base.unsqueeze(0).as_strided((1, *base.shape), (7, *base.stride()))
    if layout == "conj" and dtype.is_complex:
        return base.conj()
    if layout == "grad" and dtype in (torch.float32, torch.float64):
        return base.requires_grad_()
    return base


@st.composite
def tensor_lists(draw: st.DrawFn) -> list[torch.Tensor]:
    """Lists with repeated shapes (stacked groups), singletons (flat groups) and aliasing."""
    unique = draw(st.lists(tensors(), max_size=8))
    repeated = draw(st.lists(tensors(), max_size=2))
    for tensor in repeated:  # the same shape and dtype many times: a stacked group
        count = draw(st.integers(3, 6))
        unique += [random_tensor(draw, tensor.dtype, tuple(tensor.shape)) for _ in range(count)]
    result = draw(st.permutations(unique))
    if result and draw(st.booleans()):  # the same tensor twice, and a view of another
        result.append(result[0])
        if result[-1].dim() >= 1 and result[-1].shape[0] > 1:
            result.append(result[-1][1:])
    return result


def per_tensor_layout(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shape and strides that `.to()` gives when the tensor really changes device."""
    moved = tensor.detach().to(META)
    return tuple(moved.shape), moved.stride()


def assert_like_per_tensor(
    inputs: list[torch.Tensor], results: list[torch.Tensor], dtype: torch.dtype | None = None
) -> None:
    assert len(results) == len(inputs)
    for tensor, result in zip(inputs, results, strict=True):
        floating = tensor.is_floating_point() or tensor.is_complex()
        expected = tensor.to(dtype) if dtype is not None and floating else tensor
        assert result.dtype == expected.dtype
        assert type(result) is type(tensor)
        assert result.requires_grad == tensor.requires_grad
        if result is not tensor:
            assert (tuple(result.shape), result.stride()) == per_tensor_layout(expected)
        assert torch.equal(bits(result), bits(expected))


def flip(tensor: torch.Tensor) -> None:
    """Change every value of `tensor` in place (twice restores it)."""
    with torch.no_grad():
        if tensor.dtype is torch.bool:
            tensor.logical_not_()
        else:
            flipped = (bits(tensor) ^ 0xFF).view(tensor.dtype).reshape(tensor.shape)
            tensor.copy_(flipped)


def assert_isolated(inputs: list[torch.Tensor], results: list[torch.Tensor]) -> None:
    """Writing into any fresh result changes no other result and no input."""
    fresh = [r for r, t in zip(results, inputs, strict=True) if r is not t and r.numel()]
    for result in fresh:
        others = [other for other in [*inputs, *results] if other is not result]
        before = [bits(other).clone() for other in others]
        flip(result)
        after = [bits(other).clone() for other in others]
        flip(result)
        for old, new in zip(before, after, strict=True):
            assert torch.equal(old, new)


def move(inputs: list[torch.Tensor], target: torch.device, **options: Any) -> list[torch.Tensor]:
    """`transfer_tensors` with a request built from `options`."""
    return transfer_tensors(inputs, TransferRequest(target, **options))


def emulated(
    mode: Literal["to_accelerator", "to_host"], inputs: list[torch.Tensor], **options: Any
) -> list[torch.Tensor]:
    """`transfer_tensors` from cpu to cpu, as if one side were an accelerator."""
    with _transfer._emulating(mode):
        return move(inputs, CPU, **options)


def coalesced(results: list[torch.Tensor]) -> int:
    return sum(result._base is not None for result in results)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=60)
@given(inputs=tensor_lists())
@example(inputs=[torch.tensor(1.5), torch.tensor(True), torch.zeros(0, 3), torch.zeros(0, 3)])
def test_coalesced_matches_per_tensor(
    mode: Literal["to_accelerator", "to_host"], inputs: list[torch.Tensor]
) -> None:
    results = emulated(mode, inputs, coalesce=True)
    assert_like_per_tensor(inputs, results)
    assert_isolated(inputs, results)


@settings(max_examples=30)
@given(inputs=tensor_lists(), dtype=st.sampled_from([torch.float16, torch.float64]))
def test_dtype_casts_floating_point_and_complex_only(
    inputs: list[torch.Tensor], dtype: torch.dtype
) -> None:
    inputs = [t for t in inputs if not t.is_complex()]  # complex to real warns, as torch does
    results = emulated("to_accelerator", inputs, dtype=dtype, coalesce=True)
    assert_like_per_tensor(inputs, results, dtype)


@settings(max_examples=40)
@given(inputs=tensor_lists())
def test_meta_layouts_match_per_tensor(inputs: list[torch.Tensor]) -> None:
    results = move(inputs, META, coalesce=True)
    for tensor, result in zip(inputs, results, strict=True):
        assert result.device == META
        assert result.dtype == tensor.dtype
        assert (tuple(result.shape), result.stride()) == per_tensor_layout(tensor)


def test_small_tensors_are_coalesced_and_the_rest_go_alone() -> None:
    small = [torch.full((4, 8), float(i)) for i in range(5)]
    rare = [torch.arange(3), torch.ones(2, 2, dtype=torch.bfloat16)]
    large = torch.zeros(COALESCE_MAX_BYTES // 4 + 1)
    transposed = torch.ones(3, 4).t()
    grad = torch.ones(3, requires_grad=True)
    parameter = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    sparse = torch.tensor(1.0).to_sparse()  # 0-dim: its strides look contiguous
    inputs = [*small, *rare, large, transposed, grad, parameter, sparse]
    results = emulated("to_accelerator", inputs)
    for result in results[:7]:
        assert result._base is not None
    assert results[7:] == inputs[7:]  # alone: `.to(cpu)` returns the tensor itself
    plan = _transfer._plan_packing(inputs, on_cpu=True, source=None, limit=COALESCE_MAX_BYTES)
    assert [(g.shape, g.indices) for g in plan.groups] == [
        (torch.Size([4, 8]), [0, 1, 2, 3, 4]),
        (None, [5]),
        (None, [6]),
    ]
    assert plan.alone == [7, 8, 9, 10, 11]
    assert [g.offset % 64 for g in plan.groups] == [0, 0, 0]
    assert plan.nbytes == 5 * 128 + 64 + 64


def test_auto_coalesces_only_between_host_and_accelerator() -> None:
    inputs = [torch.ones(2), torch.zeros(2)]
    assert coalesced(move(inputs, META)) == 0  # meta is no accelerator
    assert coalesced(move(inputs, META, coalesce=True)) == 2
    assert coalesced(move(inputs, META, coalesce=False)) == 0
    assert move(inputs, CPU) == inputs  # nothing moves, nothing copies


def test_auto_leaves_a_single_small_tensor_alone() -> None:
    inputs = [torch.ones(2), torch.zeros(COALESCE_MAX_BYTES)]
    assert coalesced(emulated("to_accelerator", inputs)) == 0
    assert coalesced(emulated("to_accelerator", inputs, coalesce=True)) == 2


def test_the_rest_go_one_by_one_in_their_places() -> None:
    large, transposed = torch.zeros(COALESCE_MAX_BYTES), torch.ones(3, 4).t()
    inputs = [torch.ones(2), large, torch.zeros(2), transposed]
    results = emulated("to_accelerator", inputs, dtype=torch.float64)
    assert coalesced([results[0], results[2]]) == 2
    assert results[1]._base is None  # alone: its own `.to()`, cast on the way
    assert results[3].stride() == transposed.stride() == (1, 4)  # `.to()` keeps them
    assert [r.dtype for r in results] == [torch.float64] * 4
    assert [r.tolist() for r in results] == [t.tolist() for t in inputs]


def test_tensors_already_on_the_target_stay_themselves() -> None:
    on_meta = torch.empty(3, device=META)
    inputs = [torch.ones(2), on_meta, torch.zeros(2)]
    results = move(inputs, META, coalesce=True)
    assert results[1] is on_meta
    assert coalesced(results) == 2


def test_copies_to_the_host_come_from_one_accelerator_only() -> None:
    inputs = [torch.empty(2, device=META), torch.ones(2)]
    assert _transfer._crossing(inputs, TransferRequest(CPU)) is None
    cuda = torch.device("cuda:0")
    plan = _transfer._plan_packing(inputs, on_cpu=False, source=cuda, limit=None)
    assert plan.groups == []
    assert plan.alone == [0, 1]


def test_an_error_on_the_coalesced_path_falls_back_to_per_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (emulated)")

    monkeypatch.setattr(_transfer, "_to_accelerator", out_of_memory)
    inputs = [torch.ones(2), torch.zeros(2)]
    results = move(inputs, META, coalesce=True)
    assert coalesced(results) == 0
    assert [r.device for r in results] == [META, META]


def quantized(values: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        return torch.quantize_per_tensor(values, 0.5, 0, torch.quint8)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_and_other_special_dtypes_go_alone(
    mode: Literal["to_accelerator", "to_host"],
) -> None:
    """Their dtypes cannot be reinterpreted as bytes (`dtype.is_signed` raises for them)."""
    special = [quantized(torch.arange(4.0)), quantized(torch.ones(2, 2))]
    inputs = [*special, torch.ones(3), torch.zeros(3), torch.arange(3)]
    results = emulated(mode, inputs, coalesce=True)
    assert results[:2] == special  # alone: `.to(cpu)` returns each itself
    assert coalesced(results[2:]) == 3
    plan = _transfer._plan_packing(inputs, on_cpu=True, source=None, limit=None)
    assert plan.alone == [0, 1]
    for dtype in (torch.quint8, torch.qint32, torch.bits8, torch.bits16):
        assert _transfer._carrier(dtype) is None


def test_quantized_tensors_in_a_batch_to_a_simulated_accelerator() -> None:
    """Once a raw `RuntimeError: isSignedType not supported for quantized types`."""
    with devicekit.simulated_devices("cuda", 1):
        batch = {"q": quantized(torch.arange(4.0)), "x": torch.ones(3), "y": torch.zeros(3)}
        moved = devicekit.to_device(batch, "cuda:0")
        assert [t.device.type for t in moved.values()] == ["cuda"] * 3
        assert moved["q"].is_quantized
        assert coalesced([moved["x"], moved["y"]]) == 2
        back = devicekit.to_device(moved, "cpu")
    assert torch.equal(back["q"].dequantize(), torch.arange(4.0))


# --- The asynchrony policy: `copy_mode` ---------------------------------------------------------

CUDA0 = torch.device("cuda", 0)
CUDA1 = torch.device("cuda", 1)
MPS = torch.device("mps", 0)


@pytest.mark.parametrize(
    ("source", "target", "pinned", "mode", "expected"),
    [
        (CPU, CUDA0, True, "auto", (True, None)),
        (CPU, CUDA0, False, "auto", (False, None)),
        (CPU, CUDA0, False, True, (True, None)),
        (CPU, CUDA0, True, False, (False, None)),
        (CUDA0, CUDA1, False, "auto", (True, None)),
        (CUDA0, CUDA1, False, False, (False, None)),
        (CUDA0, CPU, False, "auto", (True, CUDA0)),
        (CUDA0, CPU, False, True, (True, CUDA0)),
        (CUDA0, CPU, False, False, (False, None)),
        (CPU, MPS, True, "auto", (True, MPS)),
        (MPS, CPU, False, "auto", (True, MPS)),
        (CPU, META, False, True, (False, None)),
        (CUDA0, CUDA0, False, True, (False, None)),
        # `None`: a module's tensors, moved by `Module.to`, which cannot be waited for
        (None, CUDA0, False, True, (True, None)),
        (None, CUDA0, False, "auto", (False, None)),
        (None, CPU, False, True, (False, None)),
        (None, MPS, False, True, (False, None)),
        (None, META, False, True, (False, None)),
    ],
)
def test_copy_mode(
    source: torch.device | None,
    target: torch.device,
    pinned: bool,
    mode: bool | Literal["auto"],
    expected: tuple[bool, torch.device | None],
) -> None:
    assert copy_mode(source, TransferRequest(target, mode), pinned=pinned) == expected


DEVICES = [CPU, META, CUDA0, CUDA1, MPS, torch.device("xpu", 0)]


@given(
    source=st.sampled_from([None, *DEVICES]),
    target=st.sampled_from(DEVICES),
    mode=st.sampled_from(["auto", True, False]),
    pinned=st.booleans(),
)
def test_copy_mode_never_leaves_a_copy_that_can_change_under_the_caller(
    source: torch.device | None,
    target: torch.device,
    mode: bool | Literal["auto"],
    pinned: bool,
) -> None:
    asynchronous, wait_for = copy_mode(source, TransferRequest(target, mode), pinned=pinned)
    if mode is False or "meta" in (target.type, getattr(source, "type", None)):
        assert (asynchronous, wait_for) == (False, None)
    if source is None:  # `Module.to` cannot be waited for: never asynchronous where it must be
        assert wait_for is None
        assert not asynchronous or (mode is True and target.type in ("cuda", "xpu"))
        return
    host_bound = target.type in ("cpu", "mps") or source.type == "mps"
    if asynchronous and host_bound:
        assert wait_for in (source, target)
        assert wait_for is not None
        assert wait_for.type != "cpu"
    if not asynchronous:
        assert wait_for is None
    if mode == "auto" and source.type == "cpu" and target.type in ("cuda", "xpu"):
        assert asynchronous is pinned  # pageable memory: blocking under "auto"


class Spy:
    """Records every `copy_mode` question and answers as `copy_mode` does."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, torch.device | None, bool]] = []

    def __call__(
        self, source: torch.device | None, request: TransferRequest, *, pinned: bool = False
    ) -> tuple[bool, torch.device | None]:
        self.asked.append((request.target_type, source, pinned))
        return copy_mode(source, request, pinned=pinned)


def test_every_copy_asks_copy_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-tensor, coalesced both ways, and modules: one function decides `non_blocking`."""
    from devicekit import _move

    spy = Spy()
    monkeypatch.setattr(_transfer, "copy_mode", spy)
    monkeypatch.setattr(_move, "copy_mode", spy)
    with devicekit.simulated_devices("cuda", 1):
        cuda = torch.device("cuda:0")
        small = [torch.ones(4) for _ in range(3)]
        large = torch.zeros(COALESCE_MAX_BYTES)
        there = devicekit.to_device([*small, large], cuda)
        assert ("cuda", CPU, True) in spy.asked  # the staging buffer, pinned
        assert ("cuda", CPU, False) in spy.asked  # the large tensor, pageable
        spy.asked.clear()
        devicekit.to_device(there[:3], "cpu")  # views of one buffer: one span copy
        assert spy.asked == [("cpu", cuda, False)]
        spy.asked.clear()
        devicekit.to_device([torch.ones(4, device=cuda) for _ in range(3)], "cpu")
        assert spy.asked == [("cpu", cuda, True)]  # coalesced to the host, pinned memory
        spy.asked.clear()
        devicekit.to_device(torch.nn.Linear(2, 2), cuda, non_blocking=True)
        assert spy.asked == [("cuda", None, False)]


@pytest.mark.parametrize("mode", ["auto", True, False])
def test_copies_to_the_host_are_waited_for_unless_blocking(
    mode: bool | Literal["auto"], monkeypatch: pytest.MonkeyPatch
) -> None:
    waited: list[list[torch.device]] = []
    monkeypatch.setattr(_transfer, "_synchronize", lambda devices: waited.append(list(devices)))
    with devicekit.simulated_devices("cuda", 1):
        cuda = torch.device("cuda:0")
        alone = [torch.ones(4, device=cuda)]
        transfer_tensors(alone, TransferRequest(CPU, mode))  # per tensor
        transfer_tensors(alone * 2, TransferRequest(CPU, mode, coalesce=True))  # coalesced
    assert waited == ([] if mode is False else [[cuda], [cuda]])


# --- Through `to_device` ----------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn) -> dict[str, object]:
    inputs = draw(tensor_lists())
    cut = draw(st.integers(0, len(inputs)))
    return {"features": inputs[:cut], "extra": {"more": tuple(inputs[cut:]), "name": "text"}}


def leaves(batch: dict[str, object]) -> list[torch.Tensor]:
    extra = batch["extra"]
    assert isinstance(batch["features"], list)
    assert isinstance(extra, dict)
    return [*batch["features"], *extra["more"]]


def same_pattern(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    """Whether the same positions hold the same objects in both lists."""
    return [[a is b for b in first] for a in first] == [[a is b for b in second] for a in second]


@settings(max_examples=40)
@given(batch=batches())
def test_to_device_coalesced_matches_per_tensor_on_meta(batch: dict[str, object]) -> None:
    coalesced_batch = devicekit.to_device(batch, "meta", coalesce=True)
    per_tensor = devicekit.to_device(batch, "meta", coalesce=False)
    assert coalesced_batch["extra"]["name"] == "text"  # type: ignore[index]
    ours, theirs = leaves(coalesced_batch), leaves(per_tensor)
    for result, reference in zip(ours, theirs, strict=True):
        assert type(result) is type(reference)
        assert result.device == META
        assert (result.shape, result.stride(), result.dtype) == (
            reference.shape,
            reference.stride(),
            reference.dtype,
        )
        assert result.requires_grad == reference.requires_grad
    assert same_pattern(ours, theirs)


@settings(max_examples=40)
@given(batch=batches())
def test_to_device_coalesced_values_alias_and_isolation(batch: dict[str, object]) -> None:
    inputs = [t for t in leaves(batch) if not t.is_complex()]  # complex to real warns
    batch = {"features": inputs, "extra": {"more": (), "name": "text"}}
    with _transfer._emulating("to_accelerator"):  # tensors to cast go "to an accelerator"
        ours = leaves(devicekit.to_device(batch, "cpu", dtype=torch.float64))
    theirs = leaves(devicekit.to_device(batch, "cpu", dtype=torch.float64, coalesce=False))
    for result, reference in zip(ours, theirs, strict=True):
        assert (result.shape, result.stride(), result.dtype) == (
            reference.shape,
            reference.stride(),
            reference.dtype,
        )
        assert torch.equal(bits(result), bits(reference))
    assert same_pattern(ours, theirs)
    assert_sharing_as_per_tensor(inputs, ours, theirs)


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)


def assert_sharing_as_per_tensor(
    inputs: list[torch.Tensor], ours: list[torch.Tensor], theirs: list[torch.Tensor]
) -> None:
    """Writing into a moved tensor changes only what per-tensor moves share memory with."""
    for i, result in enumerate(ours):
        if result is inputs[i] or not result.numel():
            continue  # not moved: the caller's own tensor
        before = [bits(other).clone() for other in [*inputs, *ours]]
        flip(result)
        after = [bits(other).clone() for other in [*inputs, *ours]]
        flip(result)
        for j, (old, new) in enumerate(zip(before, after, strict=True)):
            if not torch.equal(old, new):
                k = j - len(inputs)
                assert k >= 0, "a moved tensor shares memory with an input"
                assert storage_of(theirs[k]) == storage_of(theirs[i])


def test_to_device_coalesces_small_tensors_by_default_only_towards_accelerators() -> None:
    batch = {"x": torch.ones(4, 4), "mask": torch.ones(4, dtype=torch.bool), "ids": [1, 2]}
    assert coalesced(list(devicekit.to_device(batch, "meta").values())[:2]) == 0
    moved = devicekit.to_device(batch, "meta", coalesce=True)
    assert coalesced([moved["x"], moved["mask"]]) == 2
    assert moved["ids"] == [1, 2]


def test_to_device_keeps_views_of_one_storage_and_coalesces_the_others() -> None:
    base = torch.arange(12.0)
    batch = [base[:6], base[6:], torch.ones(3), torch.zeros(3)]
    with _transfer._emulating("to_accelerator"):
        moved = devicekit.to_device(batch, "cpu", dtype=torch.float64)
    assert moved[0].untyped_storage().data_ptr() == moved[1].untyped_storage().data_ptr()
    assert coalesced(moved[2:]) == 2
    assert [m.tolist() for m in moved] == [t.tolist() for t in batch]


@pytest.mark.parametrize("non_blocking", ["auto", True, False])
def test_to_device_coalesces_to_and_from_simulated_cuda(non_blocking: bool | str) -> None:
    """The real accelerator path (pinned staging, events) on CPU-backed simulated devices."""
    with devicekit.simulated_devices("cuda", 2):
        cuda = torch.device("cuda:1")
        batch = [torch.full((4,), float(i)) for i in range(5)] + [torch.tensor(True)]
        there = devicekit.to_device(batch, cuda, non_blocking=non_blocking)  # type: ignore[arg-type]
        assert [t.device for t in there] == [cuda] * 6
        assert coalesced(there) == 6
        on_device = [torch.full((3, 2), float(i), device=cuda) for i in range(4)]
        back = devicekit.to_device(on_device, "cpu", non_blocking=non_blocking)  # type: ignore[arg-type]
        assert [t.device for t in back] == [CPU] * 4
        assert coalesced(back) == 4
        round_trip = devicekit.to_device(there, "cpu")  # views of one buffer: one span copy
    assert all(torch.equal(a, b) for a, b in zip(batch, round_trip, strict=True))
    assert all(torch.equal(t, torch.full((3, 2), float(i))) for i, t in enumerate(back))


def test_coalescing_is_no_cross_device_op_for_the_guards() -> None:
    with devicekit.simulated_devices("cuda", 1), devicekit.device_guard():
        with devicekit.transfer_guard():
            there = devicekit.to_device([torch.ones(2), torch.zeros(3)], "cuda:0")
            back = devicekit.to_device([torch.ones(2, device="cuda:0") for _ in range(3)], "cpu")
        assert coalesced(there) == 2
        assert coalesced(back) == 3


def test_to_device_rejects_an_unknown_coalesce_value() -> None:
    with pytest.raises(devicekit.InvalidArgumentError) as caught:
        devicekit.to_device({"x": torch.ones(2)}, "meta", coalesce="yes")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "to_device(meta, coalesce='yes'): expected 'auto', True or False, got 'yes' (a str). "
        "Pass coalesce='auto' (the default) or a bool."
    )


class FakeEvent:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def synchronize(self) -> None:
        self.log.append("synchronize")


def test_staging_waits_for_the_copy_in_flight_before_reuse() -> None:
    staging = _transfer._Staging()
    log: list[str] = []
    with staging.lock:
        first = staging.take(128, pin=False)
        staging.in_flight(FakeEvent(log))  # type: ignore[arg-type]
        assert log == []
        again = staging.take(64, pin=False)
        assert log == ["synchronize"]
        assert again.data_ptr() == first.data_ptr()  # reused, not reallocated
        bigger = staging.take(100_000, pin=False)
        assert bigger.numel() == 2**17  # grown to a power of two: still one buffer
    staging.in_flight(FakeEvent(log))  # type: ignore[arg-type]
    staging.clear()
    assert log == ["synchronize", "synchronize"]


def test_the_staging_buffer_is_shared_and_sized_to_the_largest_batch() -> None:
    _transfer._STAGING.clear()
    emulated("to_accelerator", [torch.ones(100) for _ in range(4)])
    buffer = _transfer._STAGING._buffer
    assert buffer is not None
    assert buffer.numel() == _transfer._MIN_STAGING
    emulated("to_accelerator", [torch.ones(10) for _ in range(4)])
    assert _transfer._STAGING._buffer is buffer
    emulated("to_accelerator", [torch.ones(100_000) for _ in range(4)], coalesce=True)
    assert _transfer._STAGING._buffer is not None
    assert _transfer._STAGING._buffer.numel() == 2**21  # 1.6 MB, rounded up to a power of two


def test_back_to_back_calls_from_threads_never_mix_batches() -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for step in range(30):
                inputs = [torch.full((16,), float(seed * 1000 + step + i)) for i in range(8)]
                results = move(inputs, CPU)
                assert coalesced(results) == 8
                assert all(torch.equal(a, b) for a, b in zip(inputs, results, strict=True))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    with _transfer._emulating("to_accelerator"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert errors == []


def test_pinning_is_for_cuda_and_xpu_of_this_machine(
    fake_backend: Callable[..., object],
) -> None:
    assert not _transfer._pinnable(META)
    assert not _transfer._pinnable(CPU)
    fake_backend("cuda", free_memory=[2**30])
    assert _transfer._pinnable(torch.device("cuda:0"))
    assert not _transfer._pinnable(torch.device("xpu:0"))
    fake_backend("mps", free_memory=[None])
    assert not _transfer._pinnable(torch.device("mps:0"))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("non_blocking", [False, True])
@settings(max_examples=30)
@given(inputs=tensor_lists())
def test_cuda_round_trip_matches_per_tensor(non_blocking: bool, inputs: list[torch.Tensor]) -> None:
    cuda = torch.device("cuda:0")
    there = move(inputs, cuda, coalesce=True, non_blocking=non_blocking)
    expected = [t.to(cuda) for t in inputs]
    for result, reference in zip(there, expected, strict=True):
        assert (result.shape, result.stride(), result.dtype) == (
            reference.shape,
            reference.stride(),
            reference.dtype,
        )
    back = move(there, CPU, coalesce=True)
    assert_like_per_tensor(inputs, back)
    assert_isolated(inputs, back)


@needs_cuda
def test_cuda_back_to_back_batches_are_never_corrupted() -> None:
    cuda = torch.device("cuda:0")
    batches = []
    for step in range(50):
        inputs = [torch.full((256,), float(step * 100 + i)) for i in range(64)]
        batches.append((inputs, move(inputs, cuda, non_blocking=True)))
        for tensor in inputs:
            tensor.fill_(-1.0)  # the caller reuses its buffers right away
    for step, (_, results) in enumerate(batches):
        for i, result in enumerate(results):
            assert torch.equal(result.cpu(), torch.full((256,), float(step * 100 + i)))


def test_data_flows_one_way_the_transfer_imports_nothing_of_devicekit() -> None:
    """`_move` decides what to move and calls `_transfer`; `_transfer` never calls back up."""
    tree = ast.parse(Path(_transfer.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name and name.startswith("devicekit")}
    assert "torch" in imported
