"""The one resolver of device specs, and the one cache of what `"auto"` means.

`resolve` is what `as_device`, `to_device`, `default_device`, `device_guard(target=...)`,
`colocate(device=...)` and the pytest plugin's simulations call. It reads written devices with
`devicekit._discovery.parse` and answers `"auto"` from one cache. `None` (the current default
device) is `devicekit._context`'s to answer: its callers ask `current_device()` for it.

`"auto"` is chosen once per configuration and kept: consecutive batches of a process never land
on different accelerators because free memory changed in between. The configuration is what can
change the answer: the environment variables in `AUTO_ENVIRONMENT`, the accelerator type,
whether `torch.distributed` is initialised, and the devices `simulated_devices` provides.
"""

from __future__ import annotations

import os
from collections.abc import Hashable

import torch

from devicekit import _discovery
from devicekit._discovery import accelerator_type, parse

__all__ = [
    "AUTO_ENVIRONMENT",
    "CPU",
    "ENV_DEVICE",
    "META",
    "best_device",
    "explain_best_device",
    "resolve",
]

#: The environment variable that overrides what `"auto"` resolves to.
ENV_DEVICE = "DEVICEKIT_DEVICE"

#: The environment variables that can change what `"auto"` means; the cache is keyed on them.
AUTO_ENVIRONMENT = (
    ENV_DEVICE,
    "LOCAL_RANK",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
)

#: The `cpu` and `meta` devices every resolution returns: one object each, for quick `is` tests.
CPU = torch.device("cpu")
META = torch.device("meta")

#: Specs whose meaning never changes, by spec: strings and devices that name `cpu` or `meta`.
_FIXED: dict[object, torch.device] = {}
#: `"auto"`: the chosen device and the rule that chose it, by configuration (see `_configuration`).
_AUTO: dict[Hashable, tuple[torch.device, str]] = {}
# Configurations are few (a simulation is one, a changed variable another); the bound only
# keeps a process that flips variables in a loop from growing the cache without end.
_AUTO_LIMIT = 64

# `os.environ.get` encodes the key and decodes the value on each call (about a microsecond,
# six times per `to_device(x)`): the raw values read from the mapping behind it are as good a key.
_ENVIRONMENT_KEYS = tuple(os.environ.encodekey(name) for name in AUTO_ENVIRONMENT)


def _environment() -> tuple[object, ...]:
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        return tuple(map(data.get, _ENVIRONMENT_KEYS))
    return tuple(map(os.environ.get, AUTO_ENVIRONMENT))


def _distributed() -> bool:
    distributed = torch.distributed
    return bool(distributed.is_available() and distributed.is_initialized())


def _configuration() -> Hashable:
    """Everything that can change what `"auto"` means, except free memory (on purpose)."""
    return (_environment(), accelerator_type(), _distributed(), _discovery.simulation_epoch())


def _choose() -> tuple[torch.device, str]:
    """Apply the rules of `best_device` now."""
    override = os.environ.get(ENV_DEVICE)
    if override is not None and override != "auto":
        where = f"best_device(): the environment variable {ENV_DEVICE}={override!r}"
        device = parse(override, check=True, operation=where)
        return device, f"the {ENV_DEVICE} environment variable is {override!r}"
    device_type = accelerator_type()
    if device_type is None:
        return CPU, "no accelerator is available"
    if _discovery.under_distributed():
        return (
            _discovery.local_device(),
            "running under torchrun/torch.distributed: the LOCAL_RANK device",
        )
    infos = [info for info in _discovery.devices() if info.type == device_type]
    if not infos:
        return CPU, f"{device_type} reports no devices"
    if len(infos) == 1:
        return infos[0].device, f"the only {device_type} device"
    if any(info.free_memory is None for info in infos):
        index = _discovery._current_index(device_type)
        return torch.device(device_type, index), f"the current {device_type} device"
    best = max(infos, key=lambda info: (info.free_memory or 0, -(info.index or 0)))
    return best.device, f"the {device_type} device with the most free memory"


def explain_best_device() -> tuple[torch.device, str]:
    """What `"auto"` means, and which rule of `best_device` decided it.

    Example:
        >>> import devicekit
        >>> device, reason = devicekit.explain_best_device()
        >>> isinstance(reason, str)
        True
    """
    key = _configuration()
    try:
        return _AUTO[key]
    except KeyError:
        pass
    device, reason = _choose()
    if device in (CPU, META):
        device = CPU if device == CPU else META
    if len(_AUTO) >= _AUTO_LIMIT:
        _AUTO.clear()
    _AUTO[key] = device, reason
    return device, reason


def best_device() -> torch.device:
    """The device `"auto"` means, by one documented priority.

    1. The `DEVICEKIT_DEVICE` environment variable, validated like any spec.
    2. Under `torchrun`/`torch.distributed`: the accelerator `LOCAL_RANK`.
    3. The accelerator with the most free memory (the current one where memory is unknown).
    4. `cpu`.

    The choice is made once and kept while its inputs stay the same: the variables
    `DEVICEKIT_DEVICE`, `LOCAL_RANK`, `CUDA_VISIBLE_DEVICES`, `CUDA_DEVICE_ORDER`,
    `HIP_VISIBLE_DEVICES` and `ROCR_VISIBLE_DEVICES`, the accelerator type, whether
    `torch.distributed` is initialised, and an active `simulated_devices`. Free memory is
    not among them: a process does not hop between accelerators as their memory fills.
    `best_device()`, `as_device("auto")`, `to_device(x, "auto")` and (outside any
    `default_device` block) `current_device()` all give this device.

    Raises:
        InvalidDeviceSpecError: `DEVICEKIT_DEVICE` is malformed (the message names it).
        DeviceUnavailableError: `DEVICEKIT_DEVICE` or `LOCAL_RANK` names a missing device.

    Example:
        >>> import devicekit
        >>> devicekit.best_device() == devicekit.as_device("auto")
        True
    """
    return explain_best_device()[0]


def resolve(spec: object, *, operation: str, check: bool = True) -> torch.device:
    """The `torch.device` a spec other than `None` means: `"auto"` or a written device.

    `cpu` and `meta` come back as the objects `CPU` and `META`.

    Args:
        spec: `"auto"`, or anything `devicekit._discovery.parse` reads.
        operation: What the user called, for messages (`"to_device"`, `"default_device"`).
        check: Verify that the device exists on this machine.

    Raises:
        InvalidDeviceSpecError: `spec` is malformed, or `DEVICEKIT_DEVICE` is for `"auto"`.
        DeviceUnavailableError: The device is not on this machine.

    Example:
        >>> from devicekit._resolve import CPU, resolve
        >>> resolve("cpu:0", operation="to_device") is CPU
        True
    """
    try:
        return _FIXED[spec]
    except Exception:  # not cached yet, unhashable, or a hostile `__hash__`/`__eq__`
        pass
    if type(spec) is str and spec == "auto":
        return best_device()
    device = parse(spec, check=check, operation=operation)
    if device in (CPU, META):
        device = CPU if device == CPU else META
        if type(spec) is str or type(spec) is torch.device:
            _FIXED[spec] = device
    return device
