"""`nn.DataParallel` and `nn.parallel.*` across simulated devices.

`replicate`, `scatter`, `gather` and `DataParallel` move tensors between GPUs with
`torch.nn.parallel.comm`, whose `broadcast`, `broadcast_coalesced`, `scatter` and `gather` call
`torch._C` functions a CPU build does not have (`reduce_add` and `reduce_add_coalesced` are
Python and use them in turn). While a simulation is active these four are replaced by versions
made of ordinary tensor ops (`.to(device)`, `chunk`, `cat`), which the simulation turns into
CPU copies tagged with their simulated device: values are exactly the CPU's, and the results are
where CUDA puts them (the source device's share of a broadcast is the input itself, a scatter's
chunk already on its device is not copied). `parallel_apply` runs one thread per device, which
the simulation covers as it covers every thread.

`torch.nn.parallel._functions` caches one copy stream per device in a module global; the cache
is emptied for the simulation and restored after it, so no simulated stream outlives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.cuda.nccl
import torch.nn.parallel._functions
import torch.nn.parallel.comm
from torch._utils import _get_device_index

__all__ = ["patches"]


def patches(device_type: str) -> dict[tuple[object, str], object]:
    """The `nn.parallel` attributes a simulation of `device_type` replaces, with replacements."""

    def device(spec: object) -> torch.device:
        return torch.device(device_type, _get_device_index(spec))

    def broadcast(
        tensor: torch.Tensor, devices: Sequence[Any] | None = None, *, out: Any = None
    ) -> Any:
        if out is not None and devices is None:
            for target in out:
                target.copy_(tensor)
            return tuple(out)
        if devices is None or out is not None:
            raise RuntimeError(
                "Exactly one of 'devices' and 'out' must be specified, but got "
                f"devices={devices} and out={out}"
            )
        return tuple(
            tensor if tensor.device == device(spec) else tensor.to(device(spec)) for spec in devices
        )

    def broadcast_coalesced(
        tensors: Sequence[torch.Tensor], devices: Sequence[Any], buffer_size: int = 10485760
    ) -> list[tuple[torch.Tensor, ...]]:
        targets = [device(spec) for spec in devices]
        for tensor in tensors:
            if tensor.device != targets[0]:
                raise RuntimeError(
                    f"broadcast_coalesced: all tensors must be on devices[0] ({targets[0]}), "
                    f"got one on {tensor.device}"
                )
        # the source's share is the inputs themselves (a view of each, as autograd makes)
        first = tuple(tensor.view_as(tensor) for tensor in tensors)
        return [first, *(tuple(tensor.to(target) for tensor in tensors) for target in targets[1:])]

    def scatter(
        tensor: torch.Tensor,
        devices: Sequence[Any] | None = None,
        chunk_sizes: Sequence[int] | None = None,
        dim: int = 0,
        streams: object = None,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if out is not None:
            if devices is not None or chunk_sizes is not None:
                raise RuntimeError(
                    "'devices' and 'chunk_sizes' must not be specified when 'out' is specified"
                )
            sizes = [target.size(dim) for target in out]
            for target, chunk in zip(out, tensor.split_with_sizes(sizes, dim), strict=True):
                target.copy_(chunk)
            return tuple(out)
        if devices is None:
            raise RuntimeError("scatter: 'devices' must be specified when 'out' is not")
        targets = [device(spec) for spec in devices]
        if chunk_sizes is None:
            chunks = tensor.chunk(len(targets), dim)
        else:
            chunks = tensor.split_with_sizes(list(chunk_sizes), dim)
        return tuple(
            chunk.to(target, non_blocking=True)
            for chunk, target in zip(chunks, targets, strict=False)
        )

    def gather(
        tensors: Sequence[torch.Tensor],
        dim: int = 0,
        destination: object = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is not None:
            if destination is not None:
                raise RuntimeError(
                    "'destination' must not be specified when 'out' is specified, but got "
                    f"destination={destination}"
                )
            return out.copy_(torch.cat([t.to(out.device) for t in tensors], dim))
        index = _get_device_index(destination, allow_cpu=True, optional=True)
        target = torch.device("cpu") if index == -1 else torch.device(device_type, index)
        return torch.cat([t.to(target) for t in tensors], dim)

    comm = torch.nn.parallel.comm
    functions = torch.nn.parallel._functions
    found: dict[tuple[object, str], object] = {
        (comm, "broadcast"): broadcast,
        (comm, "broadcast_coalesced"): broadcast_coalesced,
        (comm, "scatter"): scatter,
        (comm, "gather"): gather,
        (functions, "_streams"): None,
        (functions.Scatter, "forward"): staticmethod(_scatter_forward),
    }
    if device_type == "cuda":  # reduce_add asks NCCL first, which warns on a CPU build
        found[(torch.cuda.nccl, "is_available")] = _no_nccl
    return found


def _no_nccl(tensors: object) -> bool:
    return False


def _scatter_forward(
    ctx: Any, target_gpus: Sequence[Any], chunk_sizes: Sequence[int] | None, dim: int, input: Any
) -> tuple[torch.Tensor, ...]:
    """`Scatter.forward` without its copy streams (a CPU input makes torch name a device by a
    bare index, which a CPU build cannot resolve; the simulation copies in order anyway)."""
    ctx.dim = dim
    ctx.input_device = input.get_device() if input.device.type != "cpu" else -1
    devices = [_get_device_index(spec, True) for spec in target_gpus]
    result: tuple[torch.Tensor, ...] = torch.nn.parallel.comm.scatter(  # type: ignore[no-untyped-call]
        input, devices, chunk_sizes, dim
    )
    return result
