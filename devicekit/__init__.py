"""devicekit: boring PyTorch device handling.

Find the devices, pick one, put models and nested batches on it, and catch cross-device mistakes
in tests.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from devicekit._colocate import colocate, colocated
from devicekit._context import carry_default_device, current_device, default_device
from devicekit._discovery import (
    DeviceInfo,
    accelerator_type,
    as_device,
    best_device,
    devices,
    explain_best_device,
    local_device,
)
from devicekit._errors import (
    CrossDeviceError,
    DevicekitError,
    DevicekitWarning,
    DeviceMismatchWarning,
    DeviceMoveWarning,
    DeviceUnavailableError,
    InvalidArgumentError,
    InvalidDeviceSpecError,
    MixedDevicesError,
    MoveError,
    ScopeError,
    SimulationError,
    TransferGuardError,
    UnmovableError,
)
from devicekit._guard import GuardPolicy, device_guard
from devicekit._move import devices_of, find_device, register_mover, to_device
from devicekit._simulate import simulated_devices
from devicekit._transfer_guard import TransferPolicy, transfer_guard
from devicekit._types import DeviceLike, SupportsTo

try:
    __version__ = _metadata.version("devicekit")
except (
    _metadata.PackageNotFoundError
):  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "CrossDeviceError",
    "DeviceInfo",
    "DeviceLike",
    "DeviceMismatchWarning",
    "DeviceMoveWarning",
    "DeviceUnavailableError",
    "DevicekitError",
    "DevicekitWarning",
    "GuardPolicy",
    "InvalidArgumentError",
    "InvalidDeviceSpecError",
    "MixedDevicesError",
    "MoveError",
    "ScopeError",
    "SimulationError",
    "SupportsTo",
    "TransferGuardError",
    "TransferPolicy",
    "UnmovableError",
    "__version__",
    "accelerator_type",
    "as_device",
    "best_device",
    "carry_default_device",
    "colocate",
    "colocated",
    "current_device",
    "default_device",
    "device_guard",
    "devices",
    "devices_of",
    "explain_best_device",
    "find_device",
    "local_device",
    "register_mover",
    "simulated_devices",
    "to_device",
    "transfer_guard",
]
