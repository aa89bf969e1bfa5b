"""One rank of the DDP integration test (`tests/test_distributed.py` launches it under torchrun).

Each rank resolves its device with `devicekit.local_device()`, trains a few DDP steps on batches
that devicekit moves, and writes what it saw to `<out>/rank<N>.json` for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import devicekit


def expected_device(local_rank: int) -> torch.device:
    accelerator = devicekit.accelerator_type()
    return torch.device("cpu") if accelerator is None else torch.device(accelerator, local_rank)


def main(out: Path, steps: int) -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    device = devicekit.local_device()
    auto = devicekit.as_device("auto")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = devicekit.to_device(
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)), device
    )
    ddp = DistributedDataParallel(
        model, device_ids=None if device.type == "cpu" else [device.index]
    )
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank sees different data
    batch_devices = []
    for _ in range(steps):
        features = torch.randn(16, 8, generator=generator)
        host_batch = {"features": features, "target": features.sum(1, keepdim=True)}
        batch = devicekit.to_device(host_batch)  # no device given: "auto", the LOCAL_RANK device
        batch_devices.append(str(batch["features"].device))
        loss = nn.functional.mse_loss(ddp(batch["features"]), batch["target"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    agree = all(torch.equal(gathered[0], other) for other in gathered[1:])
    moved = not torch.equal(flat, _initial_parameters(device))
    # Without the barrier a rank can close its gloo connections while the other one still
    # sends, and that rank aborts ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    result = {
        "rank": rank,
        "local_rank": local_rank,
        "world_size": world,
        "backend": backend,
        "device": str(device),
        "expected_device": str(expected_device(local_rank)),
        "auto": str(auto),
        "batch_devices": sorted(set(batch_devices)),
        "parameter_devices": sorted({str(p.device) for p in model.parameters()}),
        "parameters_agree": agree,
        "parameters_changed": moved,
        "loss": float(loss.detach().cpu()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")


def _initial_parameters(device: torch.device) -> torch.Tensor:
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return torch.cat([p.detach().reshape(-1) for p in fresh.parameters()]).to(device)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
