"""A torchrun script written the way GPU scripts are, for tests/test_simulate_distributed.py.

`init_process_group("nccl")`, `torch.cuda.set_device(local_rank)`, DDP with
`device_ids=[local_rank]`, a `DistributedSampler`, an `all_reduce` of a cuda tensor and rank-0
checkpointing. Run with DEVICE "cuda" under a simulation (or on GPUs), or "cpu" for the plain
gloo run it is compared with; MODE "wrong-device" makes rank 1 compare its output with a target
on cuda:0, a bug real GPUs report too.

Usage: torchrun --nproc-per-node 2 gpu_train.py DEVICE OUT_DIR [MODE]
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
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main(device_type: str, out: Path, mode: str) -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(32, 4, generator=generator)
    data = TensorDataset(features, features.sum(1, keepdim=True))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    losses = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for inputs, targets in loader:
            inputs = inputs.to(device)
            target_device = "cuda:0" if mode == "wrong-device" and rank == 1 else device
            targets = targets.to(target_device)
            loss = nn.functional.mse_loss(ddp(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / world)
    if rank == 0:
        torch.save(model.state_dict(), out / "checkpoint.pt")
    dist.barrier()
    report = {
        "rank": rank,
        "losses": losses,
        "parameter_device": str(next(model.parameters()).device),
        "reduced_device": str(total.device),
        "current_device": torch.cuda.current_device() if device_type == "cuda" else None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
