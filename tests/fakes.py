"""Emulate torch's accelerator backend and NVML at their API boundaries, for CPU-only machines.

`FakeBackend` replaces the few torch entry points devicekit's discovery reads
(`torch.accelerator.*`, `torch.cuda.is_initialized`) and the NVML reader, so tests can pretend the
machine has 0, 1 or 4 CUDA devices with chosen free memory, or an MPS device.

`FakeNvml` stands in for `libnvidia-ml` itself: it answers the C functions `devicekit._nvml`
calls through ctypes, for a machine of chosen GPUs (mixed models, PCI addresses, MIG instances),
so the matching of NVML's devices to CUDA's indices runs exactly as on a real machine.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from devicekit import _nvml, _resolve

GiB = 2**30
_OK, _NOT_SUPPORTED = 0, 3


@dataclass
class FakeGpu:
    """One GPU as NVML describes it; `instances` are its MIG instances (MIG mode is on then)."""

    name: str
    uuid: str
    pci: tuple[int, int, int]
    free: int = 40 * GiB
    total: int = 80 * GiB
    capability: tuple[int, int] | None = (9, 0)
    instances: list[FakeGpu] = field(default_factory=list)


def _out(reference: Any) -> Any:
    """The ctypes object behind `ctypes.byref(obj)`."""
    return reference._obj


class FakeNvml:
    """Answers `libnvidia-ml`'s C functions for `gpus`, listed in NVML's enumeration order.

    Handles are small integers: GPU `i` is `i + 1`, its MIG instance `j` is `100 * (i + 1) + j`.
    """

    def __init__(self, gpus: list[FakeGpu], driver: str = "555.42") -> None:
        self.gpus = gpus
        self.driver = driver
        self.by_handle: dict[int, FakeGpu] = {}
        for i, gpu in enumerate(gpus):
            self.by_handle[i + 1] = gpu
            for j, instance in enumerate(gpu.instances):
                self.by_handle[100 * (i + 1) + j] = instance

    def _gpu(self, handle: ctypes.c_void_p) -> FakeGpu:
        return self.by_handle[handle.value or 0]

    @staticmethod
    def _text(buffer: Any, text: str) -> int:
        buffer.value = text.encode()
        return _OK

    def nvmlSystemGetDriverVersion(self, buffer: Any, size: ctypes.c_uint) -> int:
        return self._text(buffer, self.driver)

    def nvmlDeviceGetCount_v2(self, count: Any) -> int:
        _out(count).value = len(self.gpus)
        return _OK

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, handle: Any) -> int:
        _out(handle).value = index.value + 1
        return _OK

    def nvmlDeviceGetName(self, handle: ctypes.c_void_p, buffer: Any, size: ctypes.c_uint) -> int:
        return self._text(buffer, self._gpu(handle).name)

    def nvmlDeviceGetUUID(self, handle: ctypes.c_void_p, buffer: Any, size: ctypes.c_uint) -> int:
        return self._text(buffer, self._gpu(handle).uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: ctypes.c_void_p, memory: Any) -> int:
        gpu, out = self._gpu(handle), _out(memory)
        out.total, out.free, out.used = gpu.total, gpu.free, gpu.total - gpu.free
        return _OK

    def nvmlDeviceGetCudaComputeCapability(
        self, handle: ctypes.c_void_p, major: Any, minor: Any
    ) -> int:
        capability = self._gpu(handle).capability
        if capability is None:
            return _NOT_SUPPORTED
        _out(major).value, _out(minor).value = capability
        return _OK

    def nvmlDeviceGetPciInfo_v3(self, handle: ctypes.c_void_p, info: Any) -> int:
        out = _out(info)
        out.domain, out.bus, out.device = self._gpu(handle).pci
        return _OK

    def nvmlDeviceGetMigMode(self, handle: ctypes.c_void_p, current: Any, pending: Any) -> int:
        if (handle.value or 0) >= 100:
            return _NOT_SUPPORTED  # an instance has no MIG mode of its own
        _out(current).value = _out(pending).value = int(bool(self._gpu(handle).instances))
        return _OK

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: ctypes.c_void_p, count: Any) -> int:
        _out(count).value = len(self._gpu(handle).instances)
        return _OK

    def nvmlDeviceGetMigDeviceHandleByIndex(
        self, handle: ctypes.c_void_p, index: ctypes.c_uint, instance: Any
    ) -> int:
        _out(instance).value = 100 * (handle.value or 0) + index.value
        return _OK


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[FakeGpu]], FakeNvml]:
    """A factory: ``fake_nvml([FakeGpu(...), ...])`` makes `devicekit._nvml` read those GPUs."""
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)

    def make(gpus: list[FakeGpu]) -> FakeNvml:
        library = FakeNvml(gpus)
        monkeypatch.setattr(_nvml, "_library", lambda: library)
        return library

    return make


@dataclass
class FakeBackend:
    monkeypatch: pytest.MonkeyPatch
    device_type: str | None = None
    free_memory: list[int | None] = field(default_factory=list)
    total_memory: int = 80 * 2**30
    current_index: int = 0
    nvml: bool = True
    #: Read NVML from this emulated library instead of from `free_memory`.
    library: FakeNvml | None = None

    def install(self) -> FakeBackend:
        mp = self.monkeypatch

        def current_accelerator(check_available: bool = False) -> torch.device | None:
            if self.device_type is None:
                return None
            return torch.device(self.device_type)

        mp.setattr(torch.accelerator, "current_accelerator", current_accelerator)
        mp.setattr(torch.accelerator, "device_count", lambda: len(self.free_memory))
        mp.setattr(torch.accelerator, "current_device_index", lambda: self.current_index)
        mp.setattr(torch.cuda, "is_initialized", lambda: False)
        if self.library is None:
            mp.setattr(_nvml, "visible_devices", self._nvml_devices)
        else:
            library = self.library
            mp.setattr(_nvml, "_library", lambda: library)
        if self.device_type == "mps":
            mp.setattr(torch.mps, "recommended_max_memory", lambda: self.total_memory)
        _resolve._AUTO.clear()
        return self

    def _nvml_devices(self) -> list[_nvml.NvmlDevice] | None:
        if not self.nvml or self.device_type != "cuda":
            return None
        if any(free is None for free in self.free_memory):
            return None
        return [
            _nvml.NvmlDevice(f"Fake GPU {i}", self.total_memory, int(free or 0), (9, 0))
            for i, free in enumerate(self.free_memory)
        ]


@pytest.fixture
def fake_backend(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A factory: ``fake_backend("cuda", free_memory=[...])`` installs an emulated backend.

    ``fake_backend("cuda", count=2, gpus=[FakeGpu(...), ...])`` emulates `count` CUDA devices
    on a machine whose NVML lists `gpus`.
    """
    for name in ("DEVICEKIT_DEVICE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)

    def make(
        device_type: str | None,
        free_memory: list[int | None] | None = None,
        *,
        count: int | None = None,
        gpus: list[FakeGpu] | None = None,
    ) -> FakeBackend:
        memory = list(free_memory or [None] * (count or 0))
        library = None if gpus is None else FakeNvml(gpus)
        return FakeBackend(monkeypatch, device_type, memory, library=library).install()

    yield make
    _resolve._AUTO.clear()
