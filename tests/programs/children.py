"""Child processes of every kind, written for tests/test_simulate_processes.py.

Started with `subprocess.run([sys.executable, "children.py", OUT.json])` from inside a
simulation, it reports what a `multiprocessing` pool (spawn), `torch.multiprocessing.spawn`
and DataLoader workers (`num_workers=2`, fork and spawn) see, and what a tensor sent to a spawned
child through a queue is on there.

Usage: python children.py OUT.json
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset


def report(index: int) -> list[object]:
    """What this process sees: the variable, the device count, a tensor made on cuda:index."""
    made = torch.ones(2, device=f"cuda:{index}") * 2
    return [os.environ.get("DEVICEKIT_SIMULATE"), torch.cuda.device_count(), str(made.device)]


def spawned(index: int, out: str) -> None:
    Path(out, f"spawn{index}.json").write_text(json.dumps(report(index)), encoding="utf-8")


def receive(queue: object, answer: object) -> None:
    tensor = queue.get()  # type: ignore[attr-defined]
    answer.put([str(tensor.device), (tensor + 1).tolist()])  # type: ignore[attr-defined]


class Numbers(Dataset[tuple[torch.Tensor, int]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index)]), torch.cuda.device_count()


def main(out: Path) -> None:
    found: dict[str, object] = {"parent": report(1)}
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(2) as pool:
        found["pool"] = pool.map(report, [0, 1])
    mp.spawn(spawned, args=(str(out.parent),), nprocs=2)
    found["torch.multiprocessing.spawn"] = [
        json.loads(Path(out.parent, f"spawn{index}.json").read_text()) for index in range(2)
    ]
    for start in ("fork", "spawn"):
        loader = DataLoader(Numbers(), batch_size=2, num_workers=2, multiprocessing_context=start)
        batches = [(features.to("cuda:1"), counts.tolist()) for features, counts in loader]
        found[f"dataloader {start}"] = [[str(f.device), counts] for f, counts in batches]
    queue, answer = mp.get_context("spawn").SimpleQueue(), mp.get_context("spawn").SimpleQueue()
    child = mp.get_context("spawn").Process(target=receive, args=(queue, answer))
    child.start()
    queue.put(torch.arange(3.0, device="cuda:1"))
    found["queue"] = answer.get()
    child.join()
    out.write_text(json.dumps(found), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
