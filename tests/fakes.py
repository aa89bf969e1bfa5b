"""Emulate torch's accelerator backend at its API boundary, for CPU-only machines.

`FakeBackend` replaces the few torch entry points devicekit's discovery reads
(`torch.accelerator.*`, `torch.cuda.is_initialized`) and the NVML reader, so tests can pretend the
machine has 0, 1 or 4 CUDA devices with chosen free memory, or an MPS device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from devicekit import _context, _nvml


@dataclass
class FakeBackend:
    monkeypatch: pytest.MonkeyPatch
    device_type: str | None = None
    free_memory: list[int | None] = field(default_factory=list)
    total_memory: int = 80 * 2**30
    current_index: int = 0
    nvml: bool = True

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
        mp.setattr(_nvml, "visible_devices", self._nvml_devices)
        if self.device_type == "mps":
            mp.setattr(torch.mps, "recommended_max_memory", lambda: self.total_memory)
        _context._auto_cache.clear()
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
    """A factory: ``fake_backend("cuda", free_memory=[...])`` installs an emulated backend."""
    monkeypatch.delenv("DEVICEKIT_DEVICE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def make(device_type: str | None, free_memory: list[int | None] | None = None) -> FakeBackend:
        return FakeBackend(monkeypatch, device_type, list(free_memory or [])).install()

    yield make
    _context._auto_cache.clear()
