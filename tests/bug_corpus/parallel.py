"""Model-parallel mix-ups across two GPUs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.bug_corpus import Case, Held


class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        return self.head(h)


def head_on_other_gpu(fixed: bool, held: Held) -> object:
    model = WithHead().to("cuda:0")
    if not fixed:
        model.head.to("cuda:1")  # left over from a memory experiment
    held.audit = model
    return model(torch.randn(2, 8, device="cuda:0"))


class Pipeline(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.stage1 = nn.Linear(8, 8).to("cuda:0")
        self.stage2 = nn.Linear(8, 2).to("cuda:1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage1(x)
        if self.fixed:
            h = h.to("cuda:1")
        return self.stage2(h)


def pipeline_no_hop(fixed: bool, held: Held) -> object:
    model = held.audit = Pipeline(fixed)
    return model(torch.randn(2, 8, device="cuda:0"))


def teacher_other_gpu(fixed: bool, held: Held) -> object:
    student = nn.Linear(8, 4).to("cuda:0")
    teacher = nn.Linear(8, 4).to("cuda:0" if fixed else "cuda:1")
    held.audit = {"student": student, "teacher": teacher}
    x = torch.randn(2, 8, device="cuda:0")
    with torch.no_grad():
        target = teacher(x)
    return F.mse_loss(student(x), target)


def input_on_other_gpu(fixed: bool, held: Held) -> object:
    model = held.audit = nn.Linear(8, 2).to("cuda:0")
    batch = torch.randn(2, 8)
    # <- input_on_other_gpu: the statement below makes the stray tensor
    x = batch.to("cuda:0" if fixed else "cuda:1")
    return model(x)


CASES = [
    Case(
        "head_on_other_gpu",
        "model parallel",
        head_on_other_gpu,
        fix="before calling model.head",
        owner="model.head.weight",
        static=True,
    ),
    Case(
        "pipeline_no_hop",
        "model parallel",
        pipeline_no_hop,
        fix="before calling model.stage2",
        owner="model.stage2.weight",
        static=True,
    ),
    Case(
        "teacher_other_gpu",
        "two models",
        teacher_other_gpu,
        fix="put both models on one device",
        owner="teacher.weight",
        static=True,
    ),
    Case(
        "input_on_other_gpu",
        "model parallel",
        input_on_other_gpu,
        fix="put both on one device",
        owner="model.weight",
    ),
]
