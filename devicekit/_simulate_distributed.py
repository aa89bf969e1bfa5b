"""`torch.distributed` under a CUDA simulation: NCCL process groups are carried by gloo.

A script written for GPUs asks for `init_process_group("nccl")` (or no backend, which on a CUDA
machine means NCCL for CUDA tensors). A simulated CUDA tensor is a CPU tensor underneath, which
gloo reduces, broadcasts and gathers for real; so while a simulation of `cuda` is active,
`init_process_group` and `new_group` map every NCCL backend to gloo (`"nccl"`,
`"cpu:gloo,cuda:nccl"`, `None`), `device_id=` is applied as `set_device` (gloo binds no device),
and `is_nccl_available()` answers `True`. Everything else is torch.distributed's own: DDP's
reducer, collectives, `DistributedSampler`, the store and torchrun. Which collectives that covers
is gloo's list: docs/distributed.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from devicekit import _simulate_mode
from devicekit._errors import SimulationError
from devicekit._simulate_mode import _Session

__all__ = ["distributed_patches"]


def _gloo_for(backend: object, function: str) -> object:
    """The backend to use in place of `backend` while CUDA is simulated."""
    if backend is None:
        return "gloo"
    if not isinstance(backend, str):
        return backend
    parts = [part.strip() for part in backend.lower().split(",")]
    backends = {part.rpartition(":")[2] for part in parts}
    if backends <= {"nccl", "gloo"}:
        return "gloo"
    raise SimulationError(
        f"torch.distributed.{function}(backend={backend!r}): devicekit simulates CUDA process "
        "groups with gloo only, so it cannot run this backend. Use 'nccl' or 'gloo' (both run "
        "on gloo under the simulation)."
    )


def _mapped(function: Callable[..., Any], name: str, session: _Session) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _simulate_mode._active is not session:
            return function(*args, **kwargs)
        position = 0 if name == "init_process_group" else 2  # new_group(ranks, timeout, backend)
        if len(args) > position:
            args = (*args[:position], _gloo_for(args[position], name), *args[position + 1 :])
        else:
            kwargs["backend"] = _gloo_for(kwargs.get("backend"), name)
        device_id = kwargs.pop("device_id", None)
        if device_id is not None:
            target = session.resolve(device_id)
            if target is None:
                raise SimulationError(
                    f"torch.distributed.{name}(device_id={device_id!r}): the simulation provides "
                    f"{session.type}:0 to {session.type}:{session.count - 1}; pass one of them."
                )
            session.current = target.index or 0
        return function(*args, **kwargs)

    return call


def distributed_patches(session: _Session) -> dict[tuple[object, str], object]:
    """The `torch.distributed` attributes to replace while `session` (of CUDA) is active."""
    if session.type != "cuda" or not torch.distributed.is_available():
        return {}
    import torch.distributed.distributed_c10d as c10d

    patches: dict[tuple[object, str], object] = {}
    for name in ("init_process_group", "new_group"):
        original = getattr(c10d, name)
        replacement = _mapped(original, name, session)
        patches[(c10d, name)] = replacement
        patches[(torch.distributed, name)] = replacement
    patches[(c10d, "is_nccl_available")] = lambda: True
    patches[(torch.distributed, "is_nccl_available")] = lambda: True
    return patches
