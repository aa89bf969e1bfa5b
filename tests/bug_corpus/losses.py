"""Labels and loss weights left on the CPU while the model is on the GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.bug_corpus import Case, Held

DEV = "cuda:0"


def train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(x.to(DEV))
    return F.cross_entropy(logits, labels)


def labels_on_cpu(fixed: bool, held: Held) -> object:
    model = held.audit = nn.Linear(8, 3).to(DEV)
    x, labels = torch.randn(4, 8), torch.tensor([0, 2, 1, 1])
    return train_step(model, x, labels.to(DEV) if fixed else labels)


def batch_labels(fixed: bool, held: Held) -> object:
    model = held.audit = nn.Linear(8, 3).to(DEV)
    loader = [{"pixels": torch.randn(4, 8), "labels": torch.tensor([0, 2, 1, 1])}]
    for raw in loader:
        batch = {"pixels": raw["pixels"].to(DEV), "labels": raw["labels"]}
        if fixed:
            batch["labels"] = batch["labels"].to(DEV)
        loss = F.cross_entropy(model(batch["pixels"]), batch["labels"])
        loss.backward()
    return None


def loss_weight_tensor(fixed: bool, held: Held) -> object:
    model = held.audit = nn.Linear(8, 3).to(DEV)
    # <- loss_weight_tensor: the statement below makes the stray tensor
    weight = torch.tensor([1.0, 3.0, 1.0], device=DEV if fixed else None)
    x, labels = torch.randn(4, 8, device=DEV), torch.tensor([0, 2, 1, 1], device=DEV)
    return F.cross_entropy(model(x), labels, weight=weight)


def criterion_not_moved(fixed: bool, held: Held) -> object:
    model = nn.Linear(8, 3)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 1.0]))
    model.to(DEV)
    if fixed:
        criterion.to(DEV)
    held.audit = criterion
    x, labels = torch.randn(4, 8, device=DEV), torch.tensor([0, 2, 1, 1], device=DEV)
    return criterion(model(x), labels)


def pos_weight_inline(fixed: bool, held: Held) -> object:
    model = held.audit = nn.Linear(8, 1).to(DEV)
    x, targets = torch.randn(4, 8, device=DEV), torch.ones(4, 1, device=DEV)
    # <- pos_weight_inline: the statement below makes the stray tensor
    return F.binary_cross_entropy_with_logits(
        model(x),
        targets,
        pos_weight=torch.tensor([3.0], device=DEV if fixed else None),
    )


CASES = [
    Case("labels_on_cpu", "labels on the CPU", labels_on_cpu, fix="labels = labels.to("),
    Case(
        "batch_labels",
        "labels on the CPU",
        batch_labels,
        fix="devicekit.to_device(batch",
        owner="batch['labels']",
    ),
    Case(
        "loss_weight_tensor",
        "loss weight as a plain tensor",
        loss_weight_tensor,
        fix="move the weight with the model",
    ),
    Case(
        "criterion_not_moved",
        "loss module not moved",
        criterion_not_moved,
        fix='criterion.to("cuda:0")',
        owner="criterion.weight",
    ),
    Case(
        "pos_weight_inline",
        "loss weight as a plain tensor",
        pos_weight_inline,
        fix="move the weight with the model",
    ),
]
