"""A multi-GPU training script written for tests/test_simulate_programs.py.

As single-node multi-GPU scripts do, it looks at `torch.cuda.device_count()`, wraps its model in
`nn.DataParallel` when there is more than one GPU (the batch is scattered over the GPUs, the
outputs gathered on the first and the gradients summed there), trains a small convolutional
classifier on synthetic images, saves `model.module`'s weights, and reports each GPU's name and
memory. The code says only "cuda".

Usage: python multi_gpu.py OUT_DIR [--device cuda] [--steps 5]
It writes OUT_DIR/result.json: the loss of every step and what it saw of the devices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)  # per sample: the same whatever the split of the batch
        self.out = nn.Linear(4 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.norm(self.conv(images))), 2)
        return self.out(x.flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model: nn.Module = Classifier().to(device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus > 1:
        model = nn.DataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(args.steps):
        images = torch.randn(8, 1, 8, 8, generator=data)
        labels = torch.randint(10, (8,), generator=data)
        output = model(images.to(device))
        loss = F.cross_entropy(output, labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = model.module if isinstance(model, nn.DataParallel) else model
    torch.save(weights.state_dict(), args.out_dir / "weights.pt")
    result = {
        "losses": losses,
        "gpus": gpus,
        "names": [torch.cuda.get_device_name(index) for index in range(gpus)],
        "allocated": [torch.cuda.memory_allocated(index) for index in range(gpus)],
        "output_device": str(output.device),
        "data_parallel": isinstance(model, nn.DataParallel),
    }
    (args.out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
