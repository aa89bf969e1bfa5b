"""Finding devices and parsing their names: `devices()`, `local_device()`, `parse()`.

This module knows what the machine has and what a written device means. It does not decide
what `None` or `"auto"` stand for: `devicekit._resolve` does, with one cache for `"auto"`.
Nothing here initialises an accelerator: device counts come from `torch.accelerator` (which
asks the driver, not a context), and memory figures for CUDA come from NVML until the user's own
code has initialised CUDA, after which torch's exact figures are used.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from devicekit import _nvml
from devicekit._errors import DeviceUnavailableError, InvalidDeviceSpecError

__all__ = [
    "DeviceInfo",
    "accelerator_type",
    "clear_simulated",
    "devices",
    "local_device",
    "parse",
    "register_simulated",
    "simulation_epoch",
]

# ASCII digits only (`re.ASCII`): CUDA and torchrun read "0" to "9", not "²" or U+FF10.
_SPEC = re.compile(r"(?P<type>[a-z][a-z0-9_]*)(?::(?P<index>0|[1-9][0-9]*))?", re.ASCII)
_INDEX = re.compile(r"[0-9]+", re.ASCII)
# c10::DeviceIndex is an 8-bit integer: larger indices wrap around silently in torch.device.
_MAX_INDEX = 127
# The whitespace torchrun and shells may leave around a number; nothing else is stripped.
_BLANKS = " \t\n\r"
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


#: The devices `devicekit.simulated_devices` provides while it is active, and a count of the
#: changes made to them (what `"auto"` was resolved under). Set through `register_simulated`.
_SIMULATED: tuple[DeviceInfo, ...] = ()
_epoch = 0


def register_simulated(infos: Iterable[DeviceInfo]) -> None:
    """Make `devices()` list `infos` after the CPU, in place of the real accelerators."""
    global _SIMULATED, _epoch
    _SIMULATED = tuple(infos)
    _epoch += 1


def clear_simulated() -> None:
    """Undo `register_simulated`: `devices()` lists the real accelerators again."""
    register_simulated(())


def simulation_epoch() -> int:
    """A number that changes whenever the simulated devices change."""
    return _epoch


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


def _nvml_match(properties: object, known: list[_nvml.NvmlDevice]) -> _nvml.NvmlDevice | None:
    """The NVML device that is the CUDA device with these properties: same PCI address or UUID.

    A GPU in MIG mode is matched by its instance's UUID only: its PCI address is shared by the
    instances, and its own memory figures are the whole GPU's.
    """
    address = tuple(
        getattr(properties, field, None)
        for field in ("pci_domain_id", "pci_bus_id", "pci_device_id")
    )
    if all(isinstance(part, int) for part in address):
        for device in known:
            if device.pci == address and not device.mig:
                return device
    uuid = str(getattr(properties, "uuid", "") or "")
    if uuid:
        for device in known:
            if device.uuid.partition("-")[2] == uuid or device.uuid == uuid:
                return device
    return None


def _accelerator_infos(device_type: str, count: int, initialize: bool) -> list[DeviceInfo]:
    module = getattr(torch, device_type, None)
    is_initialized = getattr(module, "is_initialized", None)
    exact = initialize or (callable(is_initialized) and bool(is_initialized()))
    nvidia = device_type == "cuda" and torch.version.hip is None
    from_nvml = None
    if nvidia and not exact:
        # In CUDA's index order where that order is certain (`_nvml.visible_devices`).
        from_nvml = _nvml.visible_devices()
        if from_nvml is not None and len(from_nvml) != count:
            from_nvml = None  # NVML and CUDA disagree (odd visibility): do not guess
    # Once CUDA is initialised, NVML's free memory is matched by PCI address or UUID: asking
    # `mem_get_info` instead would create a context on every GPU not yet in use.
    known = (_nvml.all_devices() or []) if nvidia and exact else []
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
            matched = _nvml_match(properties, known)
            if matched is not None:
                free, total = matched.free_memory, matched.total_memory
            elif hasattr(module, "mem_get_info"):
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
        return infos + list(_SIMULATED)
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


def show(value: object) -> str:
    """`repr(value)`, or a stand-in naming its type when its `__repr__` raises."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__qualname__} object with a failing __repr__>"


def _where(operation: str, spec: object) -> str:
    """`as_device('cuda:x')`, or the operation alone when it already names the value."""
    return operation if "=" in operation else f"{operation}({show(spec)})"


#: The operations that take `check=`: only their message offers `check=False`.
CHECKABLE = frozenset({"as_device"})


def _unavailable(operation: str, spec: object, device: torch.device) -> DeviceUnavailableError:
    available = _available()
    listed = ", ".join(str(d) for d in available)
    offer = (
        ", or pass check=False to build the torch.device anyway"
        if operation.split("(", 1)[0] in CHECKABLE
        else ""
    )
    return DeviceUnavailableError(
        f"{_where(operation, spec)}: {device} is not available on this machine. "
        f"Available devices: {listed}. Use one of those{offer}.",
        device=device,
        available=available,
    )


def _single(operation: str, spec: object, device_type: str, index: int) -> DeviceUnavailableError:
    """`cpu:1`: there is one `cpu` device, on any machine, so `check=False` cannot help."""
    return DeviceUnavailableError(
        f"{_where(operation, spec)}: there is only one {device_type} device ({device_type}, "
        f"also written {device_type}:0), so {device_type}:{index} does not exist. "
        f"Use {device_type!r}.",
        device=torch.device(device_type, index),
        available=_available(),
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


def _too_large(operation: str, spec: object, index: object) -> InvalidDeviceSpecError:
    text = str(index)
    shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"
    return _invalid(operation, spec, f"device index {shown} is larger than {_MAX_INDEX}")


def _normalize(
    operation: str, spec: object, device_type: str, index: int | None, check: bool
) -> torch.device:
    if index is not None and index > _MAX_INDEX:
        raise _too_large(operation, spec, index)
    if device_type in _UNINDEXED:
        if index not in (None, 0):
            raise _single(operation, spec, device_type, index)
        return torch.device(device_type)
    if index is None:
        index = _current_index(device_type)
    device = torch.device(device_type, index)
    if check and index >= _accelerator_count(device_type):
        raise _unavailable(operation, spec, device)
    return device


def _parse_string(operation: str, spec: str, check: bool) -> torch.device:
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise _invalid(operation, spec, "not a device spec")
    device_type, index_text = match["type"], match["index"]
    if index_text is not None and len(index_text) > len(str(_MAX_INDEX)):
        raise _too_large(operation, spec, index_text)  # before `int()`, which refuses 4301 digits
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


def parse(spec: object, *, check: bool, operation: str) -> torch.device:
    """Read a written device: a string other than `"auto"`, an accelerator index, a device.

    `None` and `"auto"` are not device names but choices; `devicekit._resolve` makes them.

    Args:
        spec: The value to read.
        check: Verify that the device exists on this machine.
        operation: What the user called, for messages (`"as_device"`, `"to_device"`).

    Raises:
        InvalidDeviceSpecError: `spec` is malformed or of another type.
        DeviceUnavailableError: `spec` is well-formed but the device is not there.

    Example:
        >>> from devicekit._discovery import parse
        >>> parse("cpu:0", check=True, operation="as_device")
        device(type='cpu')
    """
    if isinstance(spec, torch.device):
        return _normalize(operation, spec, spec.type, spec.index, check)
    if isinstance(spec, str):
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


def read_index(text: str) -> int | None:
    """The number in `text` (`LOCAL_RANK`, a `CUDA_VISIBLE_DEVICES` entry), or `None`.

    Only ASCII digits count, as for torchrun and the CUDA runtime: `"²"` and a full-width
    zero (U+FF10) are not numbers here, though `str.isdigit` says they are. Spaces, tabs and line
    breaks around the digits are ignored; any other character makes the text no number.

    Example:
        >>> from devicekit._discovery import read_index
        >>> read_index(" 3\\n"), read_index("²"), read_index("0\\x1f")
        (3, None, None)
    """
    digits = text.strip(_BLANKS)
    if _INDEX.fullmatch(digits) is None:
        return None
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(_MAX_INDEX)):
        return _MAX_INDEX + 1  # larger than any device index: `int()` of it may refuse
    return int(digits)


def local_device() -> torch.device:
    """The device this process should use under `torchrun`: accelerator `LOCAL_RANK`.

    Returns `cpu` when the machine has no accelerator. Without `LOCAL_RANK` in the
    environment, the current accelerator index is used.

    Raises:
        InvalidDeviceSpecError: `LOCAL_RANK` is not a non-negative integer of ASCII digits.
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
    rank = read_index(text)
    if rank is None:
        raise InvalidDeviceSpecError(
            f"local_device(): LOCAL_RANK={text!r} is not a non-negative integer. "
            "torchrun sets it for each process; unset it or set it to the local process index.",
            spec=text,
        )
    count = _accelerator_count(device_type)
    if rank >= count:
        shown = str(rank) if rank <= _MAX_INDEX else repr(text)
        raise DeviceUnavailableError(
            f"local_device(): LOCAL_RANK={shown} but this machine has only {count} {device_type} "
            f"device(s) (indices 0 to {count - 1}). Start at most {count} processes per node "
            "(torchrun --nproc_per_node), or check CUDA_VISIBLE_DEVICES.",
            device=torch.device(device_type, rank) if rank <= _MAX_INDEX else None,
            available=_available(),
        )
    return torch.device(device_type, rank)


def under_distributed() -> bool:
    """Whether this process runs under `torchrun` or an initialised `torch.distributed`."""
    if "LOCAL_RANK" in os.environ:
        return True
    distributed = torch.distributed
    return bool(distributed.is_available() and distributed.is_initialized())
