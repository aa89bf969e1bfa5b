"""Read NVIDIA device facts through NVML, without creating a CUDA context.

`torch.cuda.get_device_properties` and `torch.cuda.mem_get_info` initialise CUDA, which a
library must not do behind its user's back (it breaks `fork`-based data loaders and takes
hundreds of megabytes per process). NVML, the library behind `nvidia-smi`, answers the same
questions without a context. Every function here returns `None` when NVML is not there.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

__all__ = ["NvmlDevice", "driver_version", "visible_devices"]


@dataclass(frozen=True)
class NvmlDevice:
    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int] | None


class _Memory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    return lib


def _string(lib: ctypes.CDLL, function: str, *args: object) -> str | None:
    buffer = ctypes.create_string_buffer(96)
    if getattr(lib, function)(*args, buffer, ctypes.c_uint(96)) != 0:
        return None
    return buffer.value.decode(errors="replace")


def driver_version() -> str | None:
    """The NVIDIA driver version, or `None` without NVML."""
    lib = _library()
    return None if lib is None else _string(lib, "nvmlSystemGetDriverVersion")


def _handles(lib: ctypes.CDLL) -> list[ctypes.c_void_p]:
    count = ctypes.c_uint()
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return []
    handles = []
    for index in range(count.value):
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) == 0:
            handles.append(handle)
    return handles


def _visible(lib: ctypes.CDLL, handles: list[ctypes.c_void_p]) -> list[ctypes.c_void_p]:
    """Apply `CUDA_VISIBLE_DEVICES` (indices or UUID prefixes) the way the CUDA runtime does."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return handles
    uuids = [_string(lib, "nvmlDeviceGetUUID", handle) or "" for handle in handles]
    chosen: list[int] = []
    for entry in (part.strip() for part in spec.split(",")):
        if entry.isdigit() and int(entry) < len(handles):
            position = int(entry)
        else:
            matches = [i for i, uuid in enumerate(uuids) if entry and uuid.startswith(entry)]
            if len(matches) != 1:
                break  # CUDA stops at the first entry it cannot resolve
            position = matches[0]
        if position in chosen:
            break
        chosen.append(position)
    return [handles[position] for position in chosen]


def visible_devices() -> list[NvmlDevice] | None:
    """Facts about each CUDA device visible to this process, in CUDA's index order.

    Returns `None` when NVML is not available (no NVIDIA driver, or a ROCm machine).
    """
    lib = _library()
    if lib is None:
        return None
    result = []
    for handle in _visible(lib, _handles(lib)):
        memory = _Memory()
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return None
        major, minor = ctypes.c_int(), ctypes.c_int()
        status = lib.nvmlDeviceGetCudaComputeCapability(
            handle, ctypes.byref(major), ctypes.byref(minor)
        )
        result.append(
            NvmlDevice(
                name=_string(lib, "nvmlDeviceGetName", handle) or "NVIDIA GPU",
                total_memory=int(memory.total),
                free_memory=int(memory.free),
                capability=(major.value, minor.value) if status == 0 else None,
            )
        )
    return result
