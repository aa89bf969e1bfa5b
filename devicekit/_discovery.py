"""Finding devices and naming them: `devices()`, `as_device()`, `best_device()`.

Nothing here initialises an accelerator: device counts come from `torch.accelerator` (which
asks the driver, not a context), and memory figures for CUDA come from NVML until the user's own
code has initialised CUDA, after which torch's exact figures are used.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass

import torch

from devicekit import _nvml
from devicekit._errors import DeviceUnavailableError, InvalidDeviceSpecError
from devicekit._types import DeviceLike

__all__ = [
    "DeviceInfo",
    "accelerator_type",
    "as_device",
    "best_device",
    "devices",
    "explain_best_device",
    "local_device",
]

#: The environment variable that overrides what `"auto"` resolves to.
ENV_DEVICE = "DEVICEKIT_DEVICE"

_SPEC = re.compile(r"(?P<type>[a-z][a-z0-9_]*)(?::(?P<index>0|[1-9][0-9]*))?")
# c10::DeviceIndex is an 8-bit integer: larger indices wrap around silently in torch.device.
_MAX_INDEX = 127
# Device types whose tensors carry no index (`torch.empty(1).device == device("cpu")`).
_UNINDEXED = frozenset({"cpu", "meta"})
_ACCEPTED_FORMS = (
    "'auto', 'cpu', 'meta', 'gpu' or 'accelerator' (this machine's accelerator), "
    "a device type with an optional index ('cuda', 'cuda:1', 'mps', 'xpu:0'), "
    "an accelerator index (1), a torch.device, or None (the current default device)"
)


@dataclass(frozen=True)
class DeviceInfo:
    """What devicekit knows about one device.

    Attributes:
        device: The device, indexed for accelerators (`cuda:0`, never bare `cuda`).
        type: The device type (`"cpu"`, `"cuda"`, `"mps"`, ...).
        index: The accelerator index, `None` for `cpu`.
        name: A human-readable name (`"NVIDIA H100 80GB HBM3"`).
        total_memory: Total memory in bytes, or `None` where the backend cannot tell.
        free_memory: Free memory in bytes, or `None` where the backend cannot tell.
        capability: The compute capability `(major, minor)` where the backend has one.
        simulated: `True` for devices provided by `devicekit.simulated_devices`.

    Example:
        >>> import devicekit
        >>> info = devicekit.devices()[0]
        >>> info.device, info.index
        (device(type='cpu'), None)
    """

    device: torch.device
    type: str
    index: int | None
    name: str
    total_memory: int | None = None
    free_memory: int | None = None
    capability: tuple[int, int] | None = None
    simulated: bool = False

    def __str__(self) -> str:
        parts = [f"{self.device}", self.name]
        if self.total_memory is not None:
            memory = f"{_gib(self.total_memory)} total"
            if self.free_memory is not None:
                memory += f", {_gib(self.free_memory)} free"
            parts.append(memory)
        if self.capability is not None:
            parts.append(f"capability {self.capability[0]}.{self.capability[1]}")
        if self.simulated:
            parts.append("simulated")
        return " | ".join(parts)


#: The devices `devicekit.simulated_devices` provides while it is active (it fills this list).
_SIMULATED: list[DeviceInfo] = []


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def accelerator_type() -> str | None:
    """The type of this machine's available accelerator (`"cuda"`, `"mps"`, ...), or `None`.

    Example:
        >>> import devicekit
        >>> devicekit.accelerator_type() in (None, "cuda", "mps", "xpu", "mtia", "hpu")
        True
    """
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return None if accelerator is None else accelerator.type


def _accelerator_count(device_type: str) -> int:
    if device_type != accelerator_type():
        return 0
    return int(torch.accelerator.device_count())


def _current_index(device_type: str) -> int:
    """The current index of an accelerator type, without initialising it."""
    module = getattr(torch, device_type, None)
    is_initialized = getattr(module, "is_initialized", None)
    if callable(is_initialized) and is_initialized():
        return int(torch.accelerator.current_device_index())
    return 0


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip() or None
    except OSError:
        pass
    return None


def _cpu_info() -> DeviceInfo:
    total = free = None
    if hasattr(os, "sysconf"):
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            free = page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            pass
    name = _cpu_model() or platform.processor() or platform.machine() or "CPU"
    cores = os.cpu_count()
    if cores:
        name = f"{name} ({cores} cores)"
    return DeviceInfo(torch.device("cpu"), "cpu", None, name, total, free)


def _accelerator_infos(device_type: str, count: int, initialize: bool) -> list[DeviceInfo]:
    module = getattr(torch, device_type, None)
    is_initialized = getattr(module, "is_initialized", None)
    exact = initialize or (callable(is_initialized) and bool(is_initialized()))
    from_nvml = None
    if device_type == "cuda" and torch.version.hip is None and not exact:
        from_nvml = _nvml.visible_devices()
        if from_nvml is not None and len(from_nvml) != count:
            from_nvml = None  # NVML and CUDA disagree (MIG, odd visibility): do not guess
    infos = []
    for index in range(count):
        device = torch.device(device_type, index)
        name, total, free, capability = f"{device_type}:{index}", None, None, None
        if from_nvml is not None:
            fact = from_nvml[index]
            name, total, free, capability = (
                fact.name,
                fact.total_memory,
                fact.free_memory,
                fact.capability,
            )
        elif exact and module is not None:
            properties = module.get_device_properties(index)
            name = str(getattr(properties, "name", name))
            total = getattr(properties, "total_memory", None)
            if hasattr(properties, "major") and hasattr(properties, "minor"):
                capability = (int(properties.major), int(properties.minor))
            if hasattr(module, "mem_get_info"):
                free, total = (int(value) for value in module.mem_get_info(index))
        elif device_type == "mps":
            name = "Apple GPU (MPS)"
            total = int(torch.mps.recommended_max_memory())
        infos.append(DeviceInfo(device, device_type, index, name, total, free, capability))
    return infos


def devices(*, initialize: bool = False) -> list[DeviceInfo]:
    """List every usable device: `cpu` first, then each index of the machine's accelerator.

    Args:
        initialize: Allow devicekit to initialise the accelerator for exact names and memory
            figures. By default it does not (CUDA figures come from NVML, without a context);
            once your code has initialised the accelerator, exact figures are used anyway.

    Returns:
        One `DeviceInfo` per device. `CUDA_VISIBLE_DEVICES` is respected: indices are
        the visible ones, as in torch.

    Example:
        >>> import devicekit
        >>> first = devicekit.devices()[0]
        >>> first.type
        'cpu'
    """
    infos = [_cpu_info()]
    if _SIMULATED:
        return infos + _SIMULATED
    device_type = accelerator_type()
    if device_type is not None:
        count = _accelerator_count(device_type)
        infos.extend(_accelerator_infos(device_type, count, initialize))
    return infos


def _available() -> tuple[torch.device, ...]:
    found = [torch.device("cpu")]
    device_type = accelerator_type()
    if device_type is not None:
        found.extend(torch.device(device_type, i) for i in range(_accelerator_count(device_type)))
    return tuple(found)


def _where(operation: str, spec: object) -> str:
    """`as_device('cuda:x')`, or the operation alone when it already names the value."""
    return operation if "=" in operation else f"{operation}({spec!r})"


def _unavailable(operation: str, spec: object, device: torch.device) -> DeviceUnavailableError:
    available = _available()
    listed = ", ".join(str(d) for d in available)
    return DeviceUnavailableError(
        f"{_where(operation, spec)}: {device} is not available on this machine. "
        f"Available devices: {listed}. Use one of those, or pass check=False "
        "to build the torch.device anyway.",
        device=device,
        available=available,
    )


def _no_accelerator(operation: str, spec: object, problem: str) -> DeviceUnavailableError:
    available = _available()
    return DeviceUnavailableError(
        f"{_where(operation, spec)}: {problem}, and this machine has no accelerator. "
        f"Available devices: {', '.join(map(str, available))}. "
        "Use 'auto' to fall back to the CPU.",
        device=spec,
        available=available,
    )


def _invalid(operation: str, spec: object, problem: str) -> InvalidDeviceSpecError:
    return InvalidDeviceSpecError(
        f"{_where(operation, spec)}: {problem}. Expected {_ACCEPTED_FORMS}.", spec=spec
    )


def _normalize(
    operation: str, spec: object, device_type: str, index: int | None, check: bool
) -> torch.device:
    if device_type in _UNINDEXED:
        if index not in (None, 0):
            raise _unavailable(operation, spec, torch.device(device_type, index))
        return torch.device(device_type)
    if index is None:
        index = _current_index(device_type)
    if index > _MAX_INDEX:
        raise _invalid(operation, spec, f"device index {index} is larger than {_MAX_INDEX}")
    device = torch.device(device_type, index)
    if check and index >= _accelerator_count(device_type):
        raise _unavailable(operation, spec, device)
    return device


def _parse_string(operation: str, spec: str, check: bool) -> torch.device:
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise _invalid(operation, spec, "not a device spec")
    device_type, index_text = match["type"], match["index"]
    index = None if index_text is None else int(index_text)
    if device_type in ("gpu", "accelerator"):
        found = accelerator_type()
        if found is None:
            raise _no_accelerator(operation, spec, f"{device_type!r} means the accelerator")
        device_type = found
    try:
        torch.device(device_type)
    except RuntimeError:
        raise _invalid(operation, spec, f"{device_type!r} is not a torch device type") from None
    return _normalize(operation, spec, device_type, index, check)


def as_device(spec: DeviceLike = None, *, check: bool = True) -> torch.device:
    """Turn anything a user writes for a device into one normalised `torch.device`.

    Accelerator devices always come back indexed (`"cuda"` means the current CUDA device, so
    `as_device("cuda") == as_device("cuda:0")` on a fresh process), and `cpu`/`meta` never
    carry an index, matching the `.device` of tensors that live there.

    Args:
        spec: `"auto"` (see `best_device`), `"cpu"`, `"meta"`, `"cuda"`,
            `"cuda:1"`, `"gpu"`/`"accelerator"` (this machine's accelerator type),
            an `int` accelerator index, a `torch.device`, or `None` for the current
            default device (see `devicekit.current_device`).
        check: Verify that the device exists on this machine.

    Raises:
        InvalidDeviceSpecError: The spec is malformed (`"cuda:x"`, `"cuda:-1"`, `3.5`).
        DeviceUnavailableError: The spec is well-formed but the device is not there
            (`"cuda:7"` on a one-GPU machine), and `check` is true.

    Example:
        >>> import devicekit
        >>> devicekit.as_device("cpu:0"), devicekit.as_device("meta")
        (device(type='cpu'), device(type='meta'))
    """
    return _as_device(spec, check=check, operation="as_device")


def _as_device(spec: object, *, check: bool, operation: str) -> torch.device:
    if spec is None:
        from devicekit._context import current_device

        return current_device()
    if isinstance(spec, torch.device):
        return _normalize(operation, spec, spec.type, spec.index, check)
    if isinstance(spec, str):
        if spec == "auto":
            return best_device()
        return _parse_string(operation, spec, check)
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0:
            raise _invalid(operation, spec, "an accelerator index cannot be negative")
        device_type = accelerator_type()
        if device_type is None:
            if not check:
                return _normalize(operation, spec, "cuda", spec, check)
            raise _no_accelerator(operation, spec, "an integer names an accelerator index")
        return _normalize(operation, spec, device_type, spec, check)
    raise _invalid(operation, spec, f"got a {type(spec).__name__}")


def local_device() -> torch.device:
    """The device this process should use under `torchrun`: accelerator `LOCAL_RANK`.

    Returns `cpu` when the machine has no accelerator. Without `LOCAL_RANK` in the
    environment, the current accelerator index is used.

    Raises:
        InvalidDeviceSpecError: `LOCAL_RANK` is not a non-negative integer.
        DeviceUnavailableError: `LOCAL_RANK` is not below the number of accelerators.

    Example:
        >>> import devicekit
        >>> devicekit.local_device().type in ("cpu", "cuda", "mps", "xpu")
        True
    """
    device_type = accelerator_type()
    if device_type is None:
        return torch.device("cpu")
    text = os.environ.get("LOCAL_RANK")
    if text is None:
        return torch.device(device_type, _current_index(device_type))
    if not text.strip().isdigit():
        raise InvalidDeviceSpecError(
            f"local_device(): LOCAL_RANK={text!r} is not a non-negative integer. "
            "torchrun sets it for each process; unset it or set it to the local process index.",
            spec=text,
        )
    rank, count = int(text), _accelerator_count(device_type)
    if rank >= count:
        available = _available()
        raise DeviceUnavailableError(
            f"local_device(): LOCAL_RANK={rank} but this machine has only {count} {device_type} "
            f"device(s) (indices 0 to {count - 1}). Start at most {count} processes per node "
            "(torchrun --nproc_per_node), or check CUDA_VISIBLE_DEVICES.",
            device=torch.device(device_type, rank),
            available=available,
        )
    return torch.device(device_type, rank)


def _under_distributed() -> bool:
    if "LOCAL_RANK" in os.environ:
        return True
    distributed = torch.distributed
    return bool(distributed.is_available() and distributed.is_initialized())


def explain_best_device() -> tuple[torch.device, str]:
    """Resolve `"auto"` like `best_device`, and say which rule decided.

    Example:
        >>> import devicekit
        >>> device, reason = devicekit.explain_best_device()
        >>> isinstance(reason, str)
        True
    """
    override = os.environ.get(ENV_DEVICE)
    if override is not None and override != "auto":
        where = f"best_device(): the environment variable {ENV_DEVICE}={override!r}"
        device = _as_device(override, check=True, operation=where)
        return device, f"the {ENV_DEVICE} environment variable is {override!r}"
    device_type = accelerator_type()
    if device_type is None:
        return torch.device("cpu"), "no accelerator is available"
    if _under_distributed():
        return local_device(), "running under torchrun/torch.distributed: the LOCAL_RANK device"
    infos = [info for info in devices() if info.type == device_type]
    if not infos:
        return torch.device("cpu"), f"{device_type} reports no devices"
    if len(infos) == 1:
        return infos[0].device, f"the only {device_type} device"
    if any(info.free_memory is None for info in infos):
        index = _current_index(device_type)
        return torch.device(device_type, index), f"the current {device_type} device"
    best = max(infos, key=lambda info: (info.free_memory or 0, -(info.index or 0)))
    return best.device, f"the {device_type} device with the most free memory"


def best_device() -> torch.device:
    """The device `"auto"` means, by one documented priority.

    1. The `DEVICEKIT_DEVICE` environment variable, validated like any spec.
    2. Under `torchrun`/`torch.distributed`: the accelerator `LOCAL_RANK`.
    3. The accelerator with the most free memory (the current one where memory is unknown).
    4. `cpu`.

    Raises:
        InvalidDeviceSpecError: `DEVICEKIT_DEVICE` is malformed (the message names it).
        DeviceUnavailableError: `DEVICEKIT_DEVICE` or `LOCAL_RANK` names a missing device.

    Example:
        >>> import devicekit
        >>> devicekit.best_device().type in ("cpu", "cuda", "mps", "xpu")
        True
    """
    return explain_best_device()[0]
