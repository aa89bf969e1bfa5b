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

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.cuda.nccl
import torch.nn.parallel._functions
import torch.nn.parallel.comm
from torch._utils import _get_device_index
from torch.overrides import _get_current_function_mode_stack

from devicekit import _simulate_mode
from devicekit._simulate_mode import _set_tag, _simulated

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
        (functions.Scatter, "forward"): staticmethod(_remembering(_scatter_forward)),
    }
    if device_type == "cuda":  # reduce_add asks NCCL first, which warns on a CPU build
        found[(torch.cuda.nccl, "is_available")] = _no_nccl
    for forward_cls in (functions.Broadcast, functions.ReduceAddCoalesced, functions.Gather):
        forward = forward_cls.__dict__["forward"].__func__
        found[(forward_cls, "forward")] = staticmethod(_remembering(forward))
    for cls in (
        functions.Broadcast,
        functions.ReduceAddCoalesced,
        functions.Gather,
        functions.Scatter,
    ):
        found[(cls, "backward")] = staticmethod(_tagging(cls.__dict__["backward"].__func__))
    return found


def _no_nccl(tensors: object) -> bool:
    return False


# Autograd hands a Function's `backward` gradients it made in C++: plain CPU tensors, without
# the simulated device of the outputs they belong to. These Functions remember their outputs'
# devices in `forward` and give them to the gradients in `backward`.
_DEVICES = "_devicekit_output_devices"


def _remembering(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def wrapper(ctx: Any, *args: Any) -> Any:
        outputs = forward(ctx, *args)
        listed = outputs if isinstance(outputs, tuple) else (outputs,)
        setattr(
            ctx, _DEVICES, [_simulated(o) if isinstance(o, torch.Tensor) else None for o in listed]
        )
        return outputs

    return wrapper


def _tagging(backward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        for grad, device in zip(grads, getattr(ctx, _DEVICES, ()), strict=False):
            if isinstance(grad, torch.Tensor) and device is not None and _simulated(grad) is None:
                _set_tag(grad, device)
        session = _simulate_mode._active
        mode = None if session is None else session.mode
        if mode is None or _is_on_stack(mode):
            return backward(ctx, *grads)
        with mode:  # `Tensor.backward` runs with the mode popped: its copies must be simulated
            return backward(ctx, *grads)

    return wrapper


def _is_on_stack(mode: object) -> bool:
    """Whether `mode`, or the simulation's mode of another thread, is on this thread's stack."""
    stack: list[object] = _get_current_function_mode_stack()  # type: ignore[no-untyped-call]
    return any(entry is mode or type(entry).__module__ == _THREADS for entry in stack)


_THREADS = "devicekit._simulate_threads"  # where the mode of the simulation's other threads lives


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
