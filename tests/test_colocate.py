from __future__ import annotations

import asyncio
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import devicekit
from devicekit import CrossDeviceError, DeviceMoveWarning, colocate, colocated


def meta(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, device="meta")


class TestColocate:
    def test_to_the_one_accelerator(self) -> None:
        x, w = torch.ones(2, 3), meta(3, 4)
        moved_x, moved_w = colocate(x, w)
        assert moved_x.device.type == "meta"
        assert moved_w is w  # already there: the same object

    def test_nested_batches_and_modules(self) -> None:
        batch = {"inputs": [torch.ones(2), torch.zeros(3)], "mask": torch.ones(2, dtype=torch.bool)}
        model = torch.nn.Linear(2, 2, device="meta")
        moved_batch, moved_model = colocate(batch, model)
        assert list(devicekit.devices_of(moved_batch)) == [torch.device("meta")]
        assert moved_model is model
        assert type(moved_batch["inputs"]) is list

    def test_explicit_device(self) -> None:
        x, y = torch.arange(3.0), torch.arange(2.0)
        same_x, same_y = colocate(x, y, device="cpu")
        assert same_x is x
        assert same_y is y
        (moved,) = colocate(x, device="meta")
        assert moved.device.type == "meta"

    def test_default_device(self) -> None:
        with devicekit.default_device("meta"):
            (moved,) = colocate({"x": torch.ones(2, device="cpu")})
        assert moved["x"].device.type == "meta"

    def test_without_tensors(self) -> None:
        objs = ({"lr": 0.1}, [1, 2], "text")
        assert colocate(*objs) == objs
        assert colocate() == ()

    def test_two_accelerators_need_a_device(self) -> None:
        with devicekit.simulated_devices("cuda", 2):
            a, b = torch.ones(2, device="cuda:0"), torch.ones(2, device="cuda:1")
            with pytest.raises(CrossDeviceError) as info:
                colocate(a, {"b": b})
            moved_a, moved_b = colocate(a, {"b": b}, device="cuda:1")
            assert moved_a.device == moved_b["b"].device == torch.device("cuda", 1)
        assert info.value.op == "colocate"
        assert info.value.operands == (
            ("objs[0]", "f32[2] @ cuda:0"),
            ("objs[1]['b']", "f32[2] @ cuda:1"),
        )
        assert [(found.label, found.origin, found.owner) for found in info.value.provenance] == [
            ("objs[0]", "made", "a"),
            ("objs[1]['b']", "made", "b"),
        ]

    @given(
        st.lists(
            st.tuples(st.sampled_from(["cpu", "meta"]), st.integers(0, 3)), min_size=1, max_size=5
        )
    )
    def test_one_device_afterwards(self, specs: list[tuple[str, int]]) -> None:
        tensors = [torch.full((size,), float(size), device=device) for device, size in specs]
        moved = colocate(*tensors)
        devices = {t.device for t in moved}
        assert len(devices) == 1
        expected = "meta" if any(device == "meta" for device, _ in specs) else "cpu"
        assert devices == {torch.device(expected)}
        assert [tuple(t.shape) for t in moved] == [(size,) for _, size in specs]
        for before, after in zip(tensors, moved, strict=True):
            if before.device == after.device:
                assert after is before
            elif after.device.type == "cpu":
                assert torch.equal(before, after)


class TestColocated:
    def test_bare_and_called(self) -> None:
        @colocated
        def affine(x: torch.Tensor, w: torch.Tensor, *, b: torch.Tensor) -> torch.Tensor:
            return x @ w + b

        @colocated(device="meta")
        def double(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        assert affine.__name__ == "affine"
        result = affine(torch.ones(2, 3), meta(3, 4), b=torch.ones(4))
        assert result.device.type == "meta"
        assert double(torch.ones(2)).device.type == "meta"

    def test_coroutines(self) -> None:
        @colocated
        async def affine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            await asyncio.sleep(0)
            return x @ w

        assert asyncio.run(affine(torch.ones(2, 3), meta(3, 4))).device.type == "meta"

    def test_names_the_parameters(self) -> None:
        @colocated
        def add(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            return first + second

        with devicekit.simulated_devices("cuda", 2):
            a, b = torch.ones(2, device="cuda:0"), torch.ones(2, device="cuda:1")
            with pytest.raises(CrossDeviceError) as info:
                add(a, second=b)
        assert info.value.operands == (("first", "f32[2] @ cuda:0"), ("second", "f32[2] @ cuda:1"))
        assert [found.op for found in info.value.provenance] == ["torch.ones", "torch.ones"]

    def test_provenance_is_looked_up_inside_a_guard_or_simulation_only(self) -> None:
        # Outside both nothing was recorded: no provenance is looked up.
        from devicekit._colocate import _block

        assert _block() == "colocate"
        with devicekit.device_guard():
            assert _block() == "device_guard"
        with devicekit.simulated_devices("cuda", 1):
            assert _block() == "simulated_devices"

    def test_inside_a_move_guard_nothing_is_left_to_move(self) -> None:
        @colocated
        def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x @ w

        with warnings.catch_warnings(), devicekit.device_guard("move"):
            warnings.simplefilter("error", DeviceMoveWarning)
            assert matmul(torch.ones(2, 3), meta(3, 4)).device.type == "meta"
