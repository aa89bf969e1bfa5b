"""Tensors made on the CPU in the backward pass: a custom `autograd.Function.backward`, a
tensor hook, a module backward hook."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.bug_corpus import Case, Held

DEV = "cuda:0"


class ClipGrad(torch.autograd.Function):
    fixed = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # <- function_backward: the statement below makes the stray tensor
        limit = torch.full(grad.shape, 0.5, device=grad.device if ClipGrad.fixed else None)
        return torch.minimum(grad, limit)


def function_backward(fixed: bool, held: Held) -> object:
    ClipGrad.fixed = fixed
    model = held.audit = nn.Linear(8, 8).to(DEV)
    ClipGrad.apply(model(torch.randn(2, 8, device=DEV))).sum().backward()
    return None


def tensor_hook(fixed: bool, held: Held) -> object:
    model = held.audit = nn.Linear(8, 8).to(DEV)
    h = model(torch.randn(2, 8, device=DEV))

    def scale(grad: torch.Tensor) -> torch.Tensor:
        # <- tensor_hook: the statement below makes the stray tensor
        weights = torch.linspace(0.0, 1.0, grad.size(-1), device=grad.device if fixed else None)
        return grad * weights

    h.register_hook(scale)
    h.sum().backward()
    return None


def module_backward_hook(fixed: bool, held: Held) -> object:
    model = held.audit = nn.Linear(8, 8).to(DEV)

    def damp(module: nn.Module, grad_input: Any, grad_output: Any) -> Any:
        # <- module_backward_hook: the statement below makes the stray tensor
        factor = torch.ones(grad_input[0].shape, device=grad_input[0].device if fixed else None)
        return (grad_input[0] * factor,)

    model.register_full_backward_hook(damp)
    model(torch.randn(2, 8, device=DEV, requires_grad=True)).sum().backward()
    return None


CASES = [
    Case("function_backward", "backward pass", function_backward, fix="device="),
    Case("tensor_hook", "backward pass", tensor_hook, fix="device="),
    Case("module_backward_hook", "backward pass", module_backward_hook, fix="device="),
]
