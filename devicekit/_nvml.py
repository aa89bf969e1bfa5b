"""Read NVIDIA device facts through NVML, without creating a CUDA context.

`torch.cuda.get_device_properties` and `torch.cuda.mem_get_info` initialise CUDA, which a
library must not do behind its user's back (it breaks `fork`-based data loaders and takes
hundreds of megabytes per process). NVML, the library behind `nvidia-smi`, answers the same
questions without a context. Every function here returns `None` when NVML is not there.

NVML numbers GPUs in PCI bus order; CUDA numbers them fastest first unless
`CUDA_DEVICE_ORDER=PCI_BUS_ID`, then keeps those named by `CUDA_VISIBLE_DEVICES`. The facts
are matched to CUDA's indices only where that matching is certain (see `visible_devices`);
elsewhere they are left out rather than given to the wrong GPU.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

__all__ = ["NvmlDevice", "PciAddress", "all_devices", "driver_version", "visible_devices"]

#: Where a GPU sits on the PCI bus: (domain, bus, device), as NVML and CUDA both report it.
PciAddress = tuple[int, int, int]


@dataclass(frozen=True)
class NvmlDevice:
    """What NVML says about one GPU (or one MIG instance of a GPU)."""

    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int] | None
    uuid: str = ""
    pci: PciAddress | None = None
    #: A physical GPU split into MIG instances: CUDA sees the instances, not the GPU.
    mig: bool = False


class _Memory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class _PciInfo(ctypes.Structure):
    """`nvmlPciInfo_t`, as `nvmlDeviceGetPciInfo_v3` fills it."""

    _fields_ = [
        ("busIdLegacy", ctypes.c_char * 16),
        ("domain", ctypes.c_uint),
        ("bus", ctypes.c_uint),
        ("device", ctypes.c_uint),
        ("pciDeviceId", ctypes.c_uint),
        ("pciSubSystemId", ctypes.c_uint),
        ("busId", ctypes.c_char * 32),
    ]


_Handle = ctypes.c_void_p


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


def _handles(lib: ctypes.CDLL) -> list[_Handle]:
    count = ctypes.c_uint()
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return []
    handles = []
    for index in range(count.value):
        handle = _Handle()
        if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) == 0:
            handles.append(handle)
    return handles


def _pci(lib: ctypes.CDLL, handle: _Handle) -> PciAddress | None:
    info = _PciInfo()
    if lib.nvmlDeviceGetPciInfo_v3(handle, ctypes.byref(info)) != 0:
        return None
    return (int(info.domain), int(info.bus), int(info.device))


def _mig_enabled(lib: ctypes.CDLL, handle: _Handle) -> bool:
    current, pending = ctypes.c_uint(), ctypes.c_uint()
    status = lib.nvmlDeviceGetMigMode(handle, ctypes.byref(current), ctypes.byref(pending))
    return status == 0 and current.value == 1


def _mig_instances(lib: ctypes.CDLL, handle: _Handle) -> list[_Handle]:
    count = ctypes.c_uint()
    if lib.nvmlDeviceGetMaxMigDeviceCount(handle, ctypes.byref(count)) != 0:
        return []
    instances = []
    for index in range(count.value):
        instance = _Handle()
        status = lib.nvmlDeviceGetMigDeviceHandleByIndex(
            handle, ctypes.c_uint(index), ctypes.byref(instance)
        )
        if status == 0:
            instances.append(instance)
    return instances


def _describe(
    lib: ctypes.CDLL, handle: _Handle, parent: NvmlDevice | None = None
) -> NvmlDevice | None:
    memory = _Memory()
    if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
        return None
    major, minor = ctypes.c_int(), ctypes.c_int()
    status = lib.nvmlDeviceGetCudaComputeCapability(
        handle, ctypes.byref(major), ctypes.byref(minor)
    )
    capability = (major.value, minor.value) if status == 0 else None
    return NvmlDevice(
        name=_string(lib, "nvmlDeviceGetName", handle) or "NVIDIA GPU",
        total_memory=int(memory.total),
        free_memory=int(memory.free),
        capability=capability if parent is None else capability or parent.capability,
        uuid=_string(lib, "nvmlDeviceGetUUID", handle) or "",
        pci=_pci(lib, handle) if parent is None else None,  # an instance has its GPU's
        mig=parent is None and _mig_enabled(lib, handle),
    )


@dataclass(frozen=True)
class _Gpu:
    """A physical GPU: its facts, and those of its MIG instances (none without MIG)."""

    device: NvmlDevice
    instances: tuple[NvmlDevice, ...]


def _gpus(lib: ctypes.CDLL) -> list[_Gpu] | None:
    gpus = []
    for handle in _handles(lib):
        device = _describe(lib, handle)
        if device is None:
            return None
        instances: list[NvmlDevice] = []
        if device.mig:
            for instance in _mig_instances(lib, handle):
                described = _describe(lib, instance, parent=device)
                if described is not None:
                    instances.append(described)
        gpus.append(_Gpu(device, tuple(instances)))
    return gpus


def _cuda_order(gpus: list[_Gpu]) -> list[_Gpu] | None:
    """The GPUs in the order CUDA numbers them before `CUDA_VISIBLE_DEVICES`, if certain.

    With `CUDA_DEVICE_ORDER=PCI_BUS_ID` that is PCI bus order. Otherwise CUDA puts the fastest
    GPU first by a rule of its own, which is PCI bus order only where all GPUs are one model.
    A GPU in MIG mode shows CUDA its instances, in an order NVML does not give: not certain.
    """
    if any(gpu.device.mig or gpu.device.pci is None for gpu in gpus):
        return None
    by_bus = sorted(gpus, key=lambda gpu: gpu.device.pci or (0, 0, 0))
    if os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST") == "PCI_BUS_ID":
        return by_bus
    models = {(gpu.device.name, gpu.device.capability) for gpu in gpus}
    return by_bus if len(models) <= 1 else None


def _is_number(entry: str) -> bool:
    # ASCII digits only: the CUDA runtime reads neither "²" nor U+FF10 as a number.
    return entry.isascii() and entry.isdigit()


def _visible(gpus: list[_Gpu]) -> list[NvmlDevice] | None:
    """Apply `CUDA_VISIBLE_DEVICES` (indices, UUID prefixes, MIG UUIDs) as the CUDA runtime does.

    `None` where CUDA's numbering of the devices chosen cannot be known for certain.
    """
    order = _cuda_order(gpus)
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return None if order is None else [gpu.device for gpu in order]
    named = [(gpu.device.uuid, gpu.device) for gpu in gpus]
    named += [(instance.uuid, instance) for gpu in gpus for instance in gpu.instances]
    chosen: list[NvmlDevice] = []
    for entry in (part.strip() for part in spec.split(",")):
        if _is_number(entry):
            if order is None:
                return None  # an index into a numbering we cannot reproduce
            # More digits than any machine has GPUs: out of range (and `int()` may refuse it).
            if len(entry) > 6 or int(entry) >= len(order):
                break  # CUDA stops at the first entry it cannot resolve
            device = order[int(entry)].device
        else:
            matches = [device for uuid, device in named if entry and uuid.startswith(entry)]
            if len(matches) != 1:
                break
            device = matches[0]
        if device.mig:
            return None  # CUDA shows this GPU's MIG instances, not the GPU
        if any(device is seen for seen in chosen):
            break
        chosen.append(device)
    return chosen


def all_devices() -> list[NvmlDevice] | None:
    """Every NVIDIA GPU in the machine and each of its MIG instances, whatever CUDA sees.

    For matching CUDA's devices by PCI address or UUID. Returns `None` without NVML.
    """
    lib = _library()
    if lib is None:
        return None
    gpus = _gpus(lib)
    if gpus is None:
        return None
    return [device for gpu in gpus for device in (gpu.device, *gpu.instances)]


def visible_devices() -> list[NvmlDevice] | None:
    """Facts about each CUDA device visible to this process, in CUDA's index order.

    Returns `None` when NVML is not available (no NVIDIA driver, or a ROCm machine), and when
    CUDA's numbering cannot be matched for certain: GPUs of different models without
    `CUDA_DEVICE_ORDER=PCI_BUS_ID` (unless `CUDA_VISIBLE_DEVICES` names them by UUID), or a
    GPU in MIG mode not named by its MIG instance's UUID.
    """
    lib = _library()
    if lib is None:
        return None
    gpus = _gpus(lib)
    return None if gpus is None else _visible(gpus)
