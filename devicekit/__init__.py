"""devicekit: boring PyTorch device handling.

Find the devices, pick one, put models and nested batches on it, and catch cross-device mistakes
in tests.

The public names are imported on first use (PEP 562), so that `import devicekit` (and with it
the pytest plugin, which every test run in an environment with devicekit loads) costs nothing
until devicekit is actually used: torch is imported then, not before.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
import sys as _sys
import typing as _typing
from importlib import metadata as _metadata

if _typing.TYPE_CHECKING:
    from devicekit._audit import (
        AuditFinding,
        AuditReport,
        audit,
    )
    from devicekit._colocate import (
        colocate,
        colocated,
    )
    from devicekit._containers import (
        register_mover,
    )
    from devicekit._context import (
        as_device,
        carry_default_device,
        current_device,
        default_device,
    )
    from devicekit._deferred import (
        deferred,
    )
    from devicekit._discovery import (
        DeviceInfo,
        accelerator_type,
        devices,
        local_device,
    )
    from devicekit._errors import (
        AuditError,
        CrossDeviceError,
        DevicekitError,
        DevicekitWarning,
        DeviceMismatchWarning,
        DeviceMoveWarning,
        DeviceUnavailableError,
        InvalidArgumentError,
        InvalidDeviceSpecError,
        MaterializeError,
        MaterializeWarning,
        MixedDevicesError,
        MoveError,
        Provenance,
        RaceError,
        ScopeError,
        SimulationError,
        TransferGuardError,
        UnmovableError,
    )
    from devicekit._guard import (
        GuardPolicy,
        device_guard,
    )
    from devicekit._materialize import (
        materialize,
    )
    from devicekit._move import (
        to_device,
    )
    from devicekit._paths import (
        devices_of,
        find_device,
    )
    from devicekit._prefetch import (
        Prefetcher,
        prefetch,
    )
    from devicekit._resolve import (
        best_device,
        explain_best_device,
    )
    from devicekit._simulate import (
        simulated_devices,
    )
    from devicekit._transfer_guard import (
        TransferPolicy,
        transfer_guard,
    )
    from devicekit._types import (
        DeviceLike,
        SupportsTo,
    )

# Where each public name lives; `__getattr__` imports it from there on first access.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "devicekit._audit": ("AuditFinding", "AuditReport", "audit"),
    "devicekit._colocate": ("colocate", "colocated"),
    "devicekit._containers": ("register_mover",),
    "devicekit._context": ("as_device", "carry_default_device", "current_device", "default_device"),
    "devicekit._deferred": ("deferred",),
    "devicekit._discovery": ("DeviceInfo", "accelerator_type", "devices", "local_device"),
    "devicekit._errors": (
        "AuditError",
        "CrossDeviceError",
        "DevicekitError",
        "DevicekitWarning",
        "DeviceMismatchWarning",
        "DeviceMoveWarning",
        "DeviceUnavailableError",
        "InvalidArgumentError",
        "InvalidDeviceSpecError",
        "MaterializeError",
        "MaterializeWarning",
        "MixedDevicesError",
        "MoveError",
        "Provenance",
        "RaceError",
        "ScopeError",
        "SimulationError",
        "TransferGuardError",
        "UnmovableError",
    ),
    "devicekit._guard": ("GuardPolicy", "device_guard"),
    "devicekit._materialize": ("materialize",),
    "devicekit._move": ("to_device",),
    "devicekit._paths": ("devices_of", "find_device"),
    "devicekit._prefetch": ("Prefetcher", "prefetch"),
    "devicekit._resolve": ("best_device", "explain_best_device"),
    "devicekit._simulate": ("simulated_devices",),
    "devicekit._transfer_guard": ("TransferPolicy", "transfer_guard"),
    "devicekit._types": ("DeviceLike", "SupportsTo"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> _typing.Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'devicekit' has no attribute {name!r}")
    if "torch" not in _sys.modules and _os.environ.get("DEVICEKIT_SIMULATE"):
        # A child of a simulating process enters the simulation as torch is imported, which
        # imports devicekit's modules: import torch first, while none of them is half imported.
        _importlib.import_module("torch")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


try:
    __version__ = _metadata.version("devicekit")
except (
    _metadata.PackageNotFoundError
):  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "AuditError",
    "AuditFinding",
    "AuditReport",
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
    "MaterializeError",
    "MaterializeWarning",
    "MixedDevicesError",
    "MoveError",
    "Prefetcher",
    "Provenance",
    "RaceError",
    "ScopeError",
    "SimulationError",
    "SupportsTo",
    "TransferGuardError",
    "TransferPolicy",
    "UnmovableError",
    "__version__",
    "accelerator_type",
    "as_device",
    "audit",
    "best_device",
    "carry_default_device",
    "colocate",
    "colocated",
    "current_device",
    "default_device",
    "deferred",
    "device_guard",
    "devices",
    "devices_of",
    "explain_best_device",
    "find_device",
    "local_device",
    "materialize",
    "prefetch",
    "register_mover",
    "simulated_devices",
    "to_device",
    "transfer_guard",
]
