"""`torch.save` and `torch.load` of tensors on simulated devices, as with real ones.

Saving writes the location a real device would (`cuda:1`) for each storage on a simulated
device and leaves devicekit's tag out of the tensors' state, so the file is what real CUDA
writes: loading it without a simulation fails as loading a CUDA checkpoint on a CPU-only
machine does (torch's own error, suggesting `map_location`). Loading restores every storage
through torch's own `map_location` handling; a storage restored to a simulated device is
marked, and the tensor rebuilt on it is tagged with that device.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch._utils
import torch.serialization
import torch.storage

from devicekit._simulate_facts import Memory
from devicekit._simulate_mode import _TAG, _Session, _set_tag, _simulated

__all__ = ["checkpoint_patches"]


def checkpoint_patches(session: _Session, memory: Memory) -> dict[tuple[object, str], object]:
    """The torch attributes to replace while `session` is active, with their replacements."""
    kind = session.type
    #: storages restored onto a simulated device -> that device
    restored: weakref.WeakKeyDictionary[Any, torch.device] = weakref.WeakKeyDictionary()
    original_state: Callable[[Any], Any] = torch._utils._get_obj_state
    original_tag = torch.serialization.location_tag
    original_rebuild: Callable[..., torch.Tensor] = torch._utils._rebuild_tensor

    #: storage -> simulated device index, for tensors being saved that this simulation's memory
    #: does not count (made in an earlier block that simulated the same devices). Keyed by the
    #: storage object itself (torch keeps one per storage), never by its address: an address is
    #: reused by the next allocation, and a stale entry would label a CPU storage as simulated.
    saving: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def get_obj_state(obj: Any) -> Any:
        state = original_state(obj)
        device = _simulated(obj) if isinstance(obj, torch.Tensor) else None
        if device is not None:
            with contextlib.suppress(RuntimeError, NotImplementedError, TypeError):
                saving[obj.untyped_storage()] = device.index or 0
        if isinstance(state, dict) and _TAG in state:
            state = {key: value for key, value in state.items() if key != _TAG}
        elif isinstance(state, tuple) and state and isinstance(state[0], dict) and _TAG in state[0]:
            state = ({k: v for k, v in state[0].items() if k != _TAG}, *state[1:])
        return state

    def location_tag(storage: Any) -> str:
        untyped = getattr(storage, "_untyped_storage", storage)
        index = memory.device_of(untyped)
        if index is None:
            index = saving.pop(untyped, None)
        if index is not None:
            return f"{kind}:{index}"
        location: str = original_tag(storage)
        return location

    def deserialize(storage: Any, location: str) -> Any:
        if location != kind and not location.startswith(f"{kind}:"):
            return None
        requested = torch.device(location)
        if requested.index is not None and requested.index >= session.count:
            raise RuntimeError(
                f"Attempting to deserialize object on {kind.upper()} device "
                f"{requested.index} but torch.{kind}.device_count() is {session.count}. "
                "Please use torch.load with map_location to map your storages to an "
                "existing device. (devicekit simulates "
                f"{session.count} {kind} device{'s' if session.count > 1 else ''}.)"
            )
        device = session.resolve(requested)
        if device is not None:
            restored[getattr(storage, "_untyped_storage", storage)] = device
        return storage

    def rebuild_tensor(storage: Any, *args: Any) -> torch.Tensor:
        tensor = original_rebuild(storage, *args)
        device = restored.get(getattr(storage, "_untyped_storage", storage))
        if device is not None:
            _set_tag(tensor, device)
        return tensor

    storage_cuda: Callable[..., Any] = torch.storage._StorageBase.cuda
    storage_to: Callable[..., Any] = torch.storage._StorageBase.to

    def cuda(storage: Any, device: object = None, non_blocking: bool = False) -> Any:
        """`storage.cuda(1)` (a `map_location` callable's spelling): the storage, marked."""
        target = session.resolve(kind if device is None else device)
        if target is None:
            return storage_cuda(storage, device, non_blocking)
        restored[storage] = target
        return storage

    def to(storage: Any, *, device: object, non_blocking: bool = False) -> Any:
        target = session.resolve(device)
        if target is None:
            return storage_to(storage, device=device, non_blocking=non_blocking)
        restored[storage] = target
        return storage

    registry: list[tuple[int, Callable[..., Any], Callable[..., Any]]] = [
        (priority, tagger, deserialize if _restores(restorer, kind) else restorer)
        for priority, tagger, restorer in torch.serialization._package_registry
    ]
    replacements: dict[tuple[object, str], object] = {
        (torch._utils, "_get_obj_state"): get_obj_state,
        (torch._utils, "_rebuild_tensor"): rebuild_tensor,
        (torch.serialization, "location_tag"): location_tag,
        (torch.serialization, "_package_registry"): registry,
        (torch.storage._StorageBase, "to"): to,
    }
    if hasattr(torch.storage._StorageBase, kind):
        replacements[(torch.storage._StorageBase, kind)] = cuda
    return replacements


def _restores(restorer: Callable[..., Any], kind: str) -> bool:
    """Whether `restorer` is torch's deserializer for `kind` (`partial(_deserialize, "cuda")`)."""
    return bool(getattr(restorer, "args", ()) == (kind,))
