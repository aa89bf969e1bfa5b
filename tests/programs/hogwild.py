"""A hogwild-style program written for tests/test_simulate_processes.py.

Trainer processes started with `torch.multiprocessing` (spawn) update one shared model that
lives on the device named on the command line, as pytorch/examples' mnist_hogwild does with
`--cuda`. The trainers run one after the other, so the result does not depend on scheduling and
a run on "cuda" (simulated) must give exactly the CPU run's weights.

Usage: python hogwild.py DEVICE OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

STEPS = 20


def train(rank: int, model: nn.Module, device: torch.device, queue: object) -> None:
    torch.manual_seed(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        features = torch.randn(8, 4).to(device)
        target = features.sum(1, keepdim=True)
        loss = nn.functional.mse_loss(model(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    parameter = next(model.parameters())
    queue.put((rank, str(parameter.device), loss.item()))  # type: ignore[attr-defined]


def main(device: torch.device, out: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1).to(device)
    model.share_memory()
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    reports = []
    for rank in range(2):
        trainer = context.Process(target=train, args=(rank, model, device, queue))
        trainer.start()
        trainer.join()
        if trainer.exitcode != 0:
            sys.exit(f"trainer {rank} failed with exit code {trainer.exitcode}")
        reports.append(queue.get())
    prediction = model(torch.ones(3, 4, device=device))
    result = {
        "trainers": reports,
        "weight": model.weight.detach().cpu().flatten().tolist(),
        "bias": model.bias.detach().cpu().flatten().tolist(),
        "prediction_device": str(prediction.device),
    }
    out.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(torch.device(sys.argv[1]), Path(sys.argv[2]))
