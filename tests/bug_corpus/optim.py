"""Optimizer state on another device than its parameters."""

from __future__ import annotations

import torch
from torch import nn

from tests.bug_corpus import Case, Held

DEV = "cuda:0"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, device: str | None) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 8, device=device)).sum().backward()
    optimizer.step()


def optimizer_before_move(fixed: bool, held: Held) -> object:
    model = Net()
    if fixed:
        model.to(DEV)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _step(model, optimizer, DEV if fixed else None)  # a warm-up step makes the state
    model.to(DEV)
    held.audit = {"model": model, "optimizer": optimizer}
    _step(model, optimizer, DEV)
    return None


def momentum_warm_start(fixed: bool, held: Held) -> object:
    model = Net().to(DEV)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for parameter in model.parameters():
        device = parameter.device if fixed else None
        # <- momentum_warm_start: the statement below makes the stray tensor
        optimizer.state[parameter]["momentum_buffer"] = torch.zeros(parameter.shape, device=device)
    held.audit = {"model": model, "optimizer": optimizer}
    _step(model, optimizer, DEV)
    return None


CASES = [
    Case(
        "optimizer_before_move",
        "optimizer state",
        optimizer_before_move,
        fix="create the optimizer after moving the model",
        owner="optimizer.state[model.fc.weight]['exp_avg']",
        static=True,
    ),
    Case(
        "momentum_warm_start",
        "optimizer state",
        momentum_warm_start,
        fix="create the optimizer after moving the model",
        owner="optimizer.state[model.fc.weight]['momentum_buffer']",
        static=True,
    ),
]
