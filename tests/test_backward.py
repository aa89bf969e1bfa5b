"""Backward passes under the guard and the simulation (issue 15 item 4, issue 13).

The Python code autograd runs during a backward pass (a custom `autograd.Function.backward`,
tensor hooks, module backward hooks) is checked like the forward, and under a simulation the
gradients it is handed report their simulated device. Before `devicekit._backward`, none of
it ran under devicekit's modes: these tests failed with torch's own errors, or passed a bug.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import CrossDeviceError
from tests.machine import REAL_CUDA

SAME_DEVICE = "Expected all tensors to be on the same device, but found at least two devices, "
ENGINE = torch.autograd.graph._engine_run_backward

simulation_only = pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")


class StrayInBackward(torch.autograd.Function):
    """A custom function whose backward makes a tensor without `device=`: the bug."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * torch.full(grad.shape, 2.0)  # on the CPU, wherever grad is


class Scaled(torch.autograd.Function):
    """A correct custom function that saves its input for backward."""

    seen: list[torch.device] = []  # noqa: RUF012 - cleared by each test

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        Scaled.seen.append(grad.device)
        return grad * 2 * x


def stray_hook(grad: torch.Tensor) -> torch.Tensor:
    return grad + torch.ones(grad.shape)  # on the CPU: the bug


# --- the guard alone: the meta device against the CPU -------------------------------------------


def test_a_custom_backward_is_checked_by_the_guard() -> None:
    x = torch.ones(3, device="meta", requires_grad=True)
    with devicekit.device_guard(), pytest.raises(CrossDeviceError) as caught:
        StrayInBackward.apply(x).sum().backward()
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{SAME_DEVICE}meta and cpu!"
    assert lines[1] == "Tensor.__mul__ got tensors on different devices (meta, cpu):"
    assert "made by torch.full at" in str(caught.value)
    assert "return grad * torch.full(grad.shape, 2.0)" in str(caught.value)


def test_tensor_hooks_are_checked_by_the_guard() -> None:
    x = torch.ones(3, device="meta", requires_grad=True)
    with devicekit.device_guard():
        y = x * 3
        y.register_hook(stray_hook)
        with pytest.raises(CrossDeviceError, match=r"^Expected all tensors .* meta and cpu!"):
            y.sum().backward()


@pytest.mark.parametrize("kind", ["full_backward_hook", "full_backward_pre_hook"])
def test_module_backward_hooks_are_checked_by_the_guard(kind: str) -> None:
    model = torch.nn.Linear(3, 3, device="meta")

    def hook(module: torch.nn.Module, *grads: Any) -> None:
        grad_output = grads[-1][0]
        grad_output * torch.ones(grad_output.shape)  # the bug

    getattr(model, f"register_{kind}")(hook)
    with devicekit.device_guard(), pytest.raises(CrossDeviceError, match=r"Tensor\.__mul__"):
        model(torch.ones(2, 3, device="meta", requires_grad=True)).sum().backward()


def test_autograd_grad_is_checked_by_the_guard() -> None:
    x = torch.ones(3, device="meta", requires_grad=True)
    with devicekit.device_guard(), pytest.raises(CrossDeviceError, match=r"Tensor\.__mul__"):
        torch.autograd.grad(StrayInBackward.apply(x).sum(), x)


def test_the_guard_covers_backward_only_while_a_block_is_active() -> None:
    x = torch.ones(3, device="meta", requires_grad=True)
    assert torch.autograd._engine_run_backward is ENGINE
    with devicekit.device_guard("warn"):
        assert torch.autograd._engine_run_backward is not ENGINE
        with devicekit.device_guard():
            pass
        assert torch.autograd._engine_run_backward is not ENGINE  # the outer block still holds
        loss = StrayInBackward.apply(x).sum()
    assert torch.autograd._engine_run_backward is ENGINE
    assert torch.autograd.graph._engine_run_backward is ENGINE
    # Outside any block, the pass is torch's own (which refuses the CPU gradient itself).
    with pytest.raises(RuntimeError, match="not on the expected device meta") as caught:
        loss.backward()
    assert not isinstance(caught.value, CrossDeviceError)


def test_a_correct_backward_under_the_guard_gives_torchs_gradients() -> None:
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with devicekit.device_guard():
        Scaled.apply(x).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [2.0, 4.0, 6.0]


# --- under a simulation: gradients where their tensors are ---------------------------------------


@pytest.fixture
def sim() -> Iterator[list[torch.device]]:
    with devicekit.simulated_devices("cuda", 2) as made:
        yield made


@simulation_only
def test_a_custom_backward_sees_its_gradient_on_the_simulated_device(sim: object) -> None:
    Scaled.seen.clear()
    x = torch.tensor([1.0, 2.0, 3.0], device="cuda:1", requires_grad=True)
    Scaled.apply(x).sum().backward()
    assert Scaled.seen == [torch.device("cuda", 1)]
    assert x.grad is not None
    assert x.grad.device == torch.device("cuda", 1)
    assert x.grad.cpu().tolist() == [2.0, 4.0, 6.0]


@simulation_only
def test_a_stray_tensor_in_a_custom_backward_is_caught_by_the_simulation(sim: object) -> None:
    x = torch.ones(3, device="cuda:0", requires_grad=True)
    with pytest.raises(CrossDeviceError) as caught:
        StrayInBackward.apply(x).sum().backward()
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{SAME_DEVICE}cuda:0 and cpu!"
    assert lines[1] == "Tensor.__mul__ got tensors on different devices (cuda:0, cpu):"
    assert "return grad * torch.full(grad.shape, 2.0)" in str(caught.value)


@simulation_only
def test_tensor_hooks_see_simulated_gradients_and_are_checked(sim: object) -> None:
    seen: list[torch.device] = []
    x = torch.ones(3, device="cuda:1", requires_grad=True)
    y = x * 3
    y.register_hook(lambda grad: seen.append(grad.device))
    x.register_hook(lambda grad: seen.append(grad.device))
    y.sum().backward()
    assert seen == [torch.device("cuda", 1)] * 2
    z = x * 3
    z.register_hook(stray_hook)
    with pytest.raises(CrossDeviceError, match=r"cuda:1 and cpu!\nTensor.__add__"):
        z.sum().backward()


@simulation_only
def test_module_backward_hooks_see_simulated_gradients(sim: object) -> None:
    seen: dict[str, list[torch.device]] = {}
    model = torch.nn.Linear(3, 2).to("cuda:1")

    def hook(module: torch.nn.Module, grad_input: Any, grad_output: Any) -> None:
        seen["input"] = [g.device for g in grad_input if g is not None]
        seen["output"] = [g.device for g in grad_output]

    def pre_hook(module: torch.nn.Module, grad_output: Any) -> None:
        seen["pre"] = [g.device for g in grad_output]

    model.register_full_backward_hook(hook)
    model.register_full_backward_pre_hook(pre_hook)

    def accumulated(weight: torch.Tensor) -> None:
        assert weight.grad is not None
        seen["accumulated"] = [weight.grad.device]

    model.weight.register_post_accumulate_grad_hook(accumulated)
    model(torch.ones(4, 3, device="cuda:1", requires_grad=True)).sum().backward()
    cuda1 = torch.device("cuda", 1)
    assert seen == {"pre": [cuda1], "output": [cuda1], "input": [cuda1], "accumulated": [cuda1]}
    assert model.weight.grad is not None
    assert model.weight.grad.device == cuda1


@simulation_only
def test_a_module_backward_hook_with_a_bug_is_caught(sim: object) -> None:
    model = torch.nn.Linear(3, 2).to("cuda:0")

    def hook(module: torch.nn.Module, grad_output: Any) -> None:
        grad_output[0] * torch.tensor([1.0, 2.0])  # a CPU tensor: the bug

    model.register_full_backward_pre_hook(hook)
    with pytest.raises(CrossDeviceError, match=r"made by torch\.tensor at"):
        model(torch.ones(4, 3, device="cuda:0")).sum().backward()


@simulation_only
def test_autograd_grad_and_checkpoints_under_the_simulation(sim: object) -> None:
    Scaled.seen.clear()
    x = torch.tensor([1.0, 2.0], device="cuda:1", requires_grad=True)
    (grad,) = torch.autograd.grad(Scaled.apply(x).sum(), x)
    assert (grad.device, grad.cpu().tolist()) == (torch.device("cuda", 1), [2.0, 4.0])
    layer = torch.nn.Linear(2, 2).to("cuda:1")
    for reentrant in (True, False):
        out = torch.utils.checkpoint.checkpoint(
            lambda t: Scaled.apply(layer(t)), x, use_reentrant=reentrant
        )
        out.sum().backward()
    assert Scaled.seen == [torch.device("cuda", 1)] * 3  # grad(), then each checkpoint


@simulation_only
def test_the_simulation_covers_backward_only_while_active() -> None:
    with devicekit.simulated_devices("cuda", 1):
        assert torch.autograd._engine_run_backward is not ENGINE
    assert torch.autograd._engine_run_backward is ENGINE
    assert "apply" not in vars(torch.autograd.function.BackwardCFunction) or (
        vars(torch.autograd.function.BackwardCFunction)["apply"].__qualname__
        == "BackwardCFunction.apply"
    )


HOOKS: dict[str, Callable[[torch.Tensor, list[torch.device]], torch.Tensor]] = {
    "tensor hook": lambda x, seen: _hooked(x * 1, seen),
    "custom backward": lambda x, seen: _recording(x, seen),
}


def _hooked(y: torch.Tensor, seen: list[torch.device]) -> torch.Tensor:
    y.register_hook(lambda grad: seen.append(grad.device))
    return y


def _recording(x: torch.Tensor, seen: list[torch.device]) -> torch.Tensor:
    Scaled.seen = seen
    return Scaled.apply(x)


@simulation_only
@settings(max_examples=20, deadline=None)
@given(index=st.integers(0, 2), hook=st.sampled_from(sorted(HOOKS)), size=st.integers(1, 4))
def test_every_gradient_python_sees_is_where_its_tensor_is(
    index: int, hook: str, size: int
) -> None:
    with devicekit.simulated_devices("cuda", 3):
        seen: list[torch.device] = []
        x = torch.ones(size, device=f"cuda:{index}", requires_grad=True)
        HOOKS[hook](x, seen).sum().backward()
        assert seen == [torch.device("cuda", index)]
