"""What a simulated device is: its facts (name, memory, compute capability) and its memory use.

`DeviceFacts` is chosen when a simulation starts (`simulated_devices("cuda", 2, memory="80GiB",
capability=(9, 0))`); `torch.cuda.get_device_properties` and friends answer from it. `Memory`
counts the bytes of the storages that live on each simulated device, as CUDA's caching
allocator reports them (`memory_allocated`, `memory_stats`, peaks), and raises CUDA's
`torch.OutOfMemoryError` when a new storage does not fit. It is an estimate: no rounding to
allocator blocks, no cache (reserved equals allocated), no memory of kernels or the context.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from devicekit._errors import InvalidArgumentError

__all__ = [
    "DEFAULT_FACTS",
    "DeviceFacts",
    "DeviceProperties",
    "Memory",
    "admit",
    "format_size",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
#: The active simulation's memory (set while it is active, by `_simulate_patches`).
active: Memory | None = None
# Allocations up to 1 MiB come from CUDA's small pool, larger ones from the large pool.
_SMALL = 1 << 20


@dataclass(frozen=True)
class DeviceFacts:
    """The hardware a simulated device pretends to be (one set for every simulated device).

    The defaults are those of an NVIDIA H100 80GB (SXM): 80 GiB, compute capability 9.0,
    132 streaming multiprocessors, bfloat16 and TF32 supported.
    """

    name: str = "NVIDIA H100 80GB HBM3"
    total_memory: int = 80 * 2**30
    capability: tuple[int, int] = (9, 0)
    multi_processor_count: int = 132

    @classmethod
    def build(
        cls,
        operation: str,
        memory: int | str | None = None,
        capability: tuple[int, int] | None = None,
        name: str | None = None,
    ) -> DeviceFacts:
        """The facts `simulated_devices(..., memory=, capability=, name=)` asks for, checked."""
        facts = cls()
        total = facts.total_memory if memory is None else parse_size(operation, memory)
        if capability is None:
            capability = facts.capability
        elif not (
            isinstance(capability, tuple)
            and len(capability) == 2
            and all(isinstance(part, int) and not isinstance(part, bool) for part in capability)
            and all(part >= 0 for part in capability)
        ):
            raise InvalidArgumentError(
                f"{operation}: capability={capability!r} is not a compute capability. "
                "Pass a (major, minor) tuple of non-negative integers, e.g. capability=(8, 0)."
            )
        if name is None:
            name = facts.name
        elif not isinstance(name, str) or not name:
            raise InvalidArgumentError(
                f"{operation}: name={name!r} is not a device name. Pass a non-empty string, "
                "e.g. name='NVIDIA A100-SXM4-40GB'."
            )
        return cls(name, total, capability, facts.multi_processor_count)

    @property
    def bf16(self) -> bool:
        """Whether the device computes in bfloat16 natively (compute capability 8.0 and up)."""
        return self.capability >= (8, 0)


DEFAULT_FACTS = DeviceFacts()


def parse_size(operation: str, size: int | str) -> int:
    """Bytes in `size`: an int, or a string such as `"80GiB"`, `"512 MB"`, `"1.5GiB"`."""
    if isinstance(size, int) and not isinstance(size, bool):
        count = size
    elif isinstance(size, str) and (match := _SIZE.fullmatch(size)) is not None:
        count = int(float(match[1]) * _UNITS[(match[2] or "").lower()])
    else:
        raise InvalidArgumentError(
            f"{operation}: memory={size!r} is not an amount of memory. Pass bytes as an int or "
            "a string with a unit, e.g. memory='80GiB' or memory='512MB'."
        )
    if count <= 0:
        raise InvalidArgumentError(
            f"{operation}: memory={size!r} must be positive, e.g. memory='16GiB'."
        )
    return count


def format_size(count: float) -> str:
    """`count` bytes as CUDA's messages write them: `20.00 MiB`."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} bytes" if unit == "bytes" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} TiB"


class DeviceProperties:
    """`torch.cuda.get_device_properties()` of a simulated device (CUDA's fields and repr)."""

    def __init__(self, facts: DeviceFacts, index: int) -> None:
        self.name = facts.name
        self.major, self.minor = facts.capability
        self.total_memory = facts.total_memory
        self.multi_processor_count = facts.multi_processor_count
        self.is_integrated = 0
        self.is_multi_gpu_board = 0
        self.max_threads_per_multi_processor = 2048
        self.max_threads_per_block = 1024
        self.warp_size = 32
        self.regs_per_multiprocessor = 65536
        self.shared_memory_per_block = 49152
        self.shared_memory_per_block_optin = 232448
        self.shared_memory_per_multiprocessor = 233472
        self.L2_cache_size = 50 * 2**20
        self.clock_rate = 1980000
        self.memory_clock_rate = 2619000
        self.memory_bus_width = 5120
        self.gcnArchName = "NVIDIA CUDA"
        self.uuid = f"00000000-0000-0000-0000-{index:012d}"
        self.pci_bus_id = index
        self.pci_device_id = 0
        self.pci_domain_id = 0

    def __repr__(self) -> str:
        return (
            f"_CudaDeviceProperties(name={self.name!r}, major={self.major}, minor={self.minor}, "
            f"total_memory={self.total_memory // 2**20}MB, "
            f"multi_processor_count={self.multi_processor_count}, uuid={self.uuid}, "
            f"pci_bus_id={self.pci_bus_id}, pci_device_id={self.pci_device_id}, "
            f"pci_domain_id={self.pci_domain_id}, L2_cache_size={self.L2_cache_size // 2**20}MB)"
        )


class _Pool:
    """One pool's counters, as CUDA's allocator keeps them (bytes and allocations); `Memory.add`
    counts a new storage into them."""

    __slots__ = ("count", "count_peak", "counted", "freed", "freed_count", "peak", "size", "total")

    def __init__(self) -> None:
        self.size = self.peak = self.total = self.freed = 0
        self.count = self.count_peak = self.counted = self.freed_count = 0

    def remove(self, nbytes: int) -> None:
        self.size -= nbytes
        self.freed += nbytes
        self.count -= 1
        self.freed_count += 1


class Memory:
    """Live bytes per simulated device, counted per storage.

    A storage counts from the first time a tensor on a simulated device is tagged with it until
    the storage is freed (a weak reference to the storage's Python object says when: torch keeps
    that object alive while any tensor, autograd's saved ones included, still uses the storage).
    Views and in-place results share a counted storage and add nothing. A storage's size is
    that of the tensor that first showed it (the whole storage for every result torch allocates).
    """

    def __init__(self, device_type: str, count: int, capacity: int) -> None:
        self.type = device_type
        self.capacity = capacity
        self.fraction = 1.0
        self.pools = [
            {"all": _Pool(), "large_pool": _Pool(), "small_pool": _Pool()} for _ in range(count)
        ]
        self.ooms = [0] * count
        #: storage address -> (device index, bytes, its device's "all" pool, its own pool)
        self.live: dict[int, tuple[int, int, _Pool, _Pool]] = {}
        #: the weak references to the storages whose callbacks end the counting (kept alive here)
        self.refs: dict[int, tuple[weakref.ref[torch.UntypedStorage], int]] = {}

    def allocated(self, index: int) -> int:
        return self.pools[index]["all"].size

    def limit(self) -> int:
        return int(self.capacity * self.fraction)

    def add(self, tensor: torch.Tensor, device: torch.device) -> None:
        """Count `tensor`'s storage on `device` while the storage lives (once per storage)."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse and nested tensors have no storage of their own
        key: int = storage._cdata  # the storage's address, as `device_of` keys it
        if key in self.live:
            return  # a view, or an in-place result: its storage is counted already
        nbytes = tensor.nbytes
        index = device.index or 0
        pools = self.pools[index]
        total = pools["all"]
        if total.size + nbytes > int(self.capacity * self.fraction):
            self.ooms[index] += 1
            raise self.out_of_memory(index, nbytes)
        pool = pools["small_pool" if nbytes <= _SMALL else "large_pool"]
        for counter in (total, pool):  # `_Pool.add`, inlined: this runs for every new storage
            counter.size += nbytes
            counter.total += nbytes
            counter.count += 1
            counter.counted += 1
            if counter.size > counter.peak:
                counter.peak = counter.size
            if counter.count > counter.count_peak:
                counter.count_peak = counter.count
        self.live[key] = (index, nbytes, total, pool)
        # torch keeps one Python object per storage while any tensor uses it: its weak
        # reference's callback runs when the last tensor (tagged or not) lets go.
        reference = weakref.ref(storage, self._gone)
        self.refs[id(reference)] = (reference, key)

    def _gone(self, reference: weakref.ref[torch.UntypedStorage]) -> None:
        found = self.refs.pop(id(reference), None)
        if found is None:
            return
        entry = self.live.pop(found[1], None)
        if entry is None:
            return
        _, nbytes, total, pool = entry
        total.remove(nbytes)
        pool.remove(nbytes)

    def device_of(self, storage: torch.UntypedStorage) -> int | None:
        """The simulated device index a storage is counted on, or `None`."""
        entry = self.live.get(storage._cdata)
        return None if entry is None else int(entry[0])

    def out_of_memory(self, index: int, nbytes: int) -> torch.OutOfMemoryError:
        allocated = self.allocated(index)
        total = self.limit()
        return torch.OutOfMemoryError(
            f"{self.type.upper()} out of memory. Tried to allocate {format_size(nbytes)}. "
            f"GPU {index} has a total capacity of {format_size(total)} of which "
            f"{format_size(total - allocated)} is free. Of the allocated memory "
            f"{format_size(allocated)} is allocated by PyTorch, and 0 bytes is reserved by "
            f"PyTorch but unallocated. (devicekit simulates {self.type}:{index} with "
            f"{format_size(total)}; choose the size with simulated_devices(..., memory=...).)"
        )

    def stats(self, index: int) -> OrderedDict[str, int]:
        """`torch.cuda.memory_stats()`: CUDA's keys, so `memory_summary` formats them."""
        stats: dict[str, int] = {}
        for pool_name, pool in self.pools[index].items():
            counts = (pool.count, pool.count_peak, pool.counted, pool.freed_count)
            sizes = (pool.size, pool.peak, pool.total, pool.freed)
            for metric in ("allocation", "active", "segment"):
                stats.update(_four(f"{metric}.{pool_name}", counts))
            for metric in ("allocated_bytes", "active_bytes", "requested_bytes", "reserved_bytes"):
                stats.update(_four(f"{metric}.{pool_name}", sizes))
            stats.update(_four(f"inactive_split.{pool_name}", (0, 0, 0, 0)))
            stats.update(_four(f"inactive_split_bytes.{pool_name}", (0, 0, 0, 0)))
        stats.update(_four("oversize_allocations", (0, 0, 0, 0)))
        stats.update(_four("oversize_segments", (0, 0, 0, 0)))
        stats.update(
            {
                "max_split_size": -1,
                "num_alloc_retries": 0,
                "num_device_alloc": self.pools[index]["all"].counted,
                "num_device_free": self.pools[index]["all"].freed_count,
                "num_ooms": self.ooms[index],
                "num_sync_all_streams": 0,
            }
        )
        return OrderedDict(sorted(stats.items()))

    def reset_peak(self, index: int) -> None:
        for pool in self.pools[index].values():
            pool.peak = pool.size
            pool.count_peak = pool.count

    def reset_accumulated(self, index: int) -> None:
        for pool in self.pools[index].values():
            pool.total = pool.counted = pool.freed = pool.freed_count = 0
        self.ooms[index] = 0


#: Factories whose leading arguments (or `size=`) are the shape of the tensor they make.
_SHAPED = frozenset({"empty", "zeros", "ones", "full", "rand", "randn", "randint", "empty_strided"})


def admit(func: Any, args: Sequence[Any], kwargs: dict[str, Any], device: torch.device) -> None:
    """Raise CUDA's `OutOfMemoryError` before a factory makes a tensor that cannot fit on the
    simulated `device` (before the CPU tries to allocate it)."""
    memory = active
    name = getattr(func, "__name__", "")
    if memory is None or name not in _SHAPED:
        return
    shape: Any = kwargs.get("size")
    if shape is None:
        skip = 1 if name == "randint" else 0
        sizes = [a for a in args[skip:] if not isinstance(a, torch.Tensor)]
        if name == "randint" and len(sizes) > 1 and isinstance(sizes[0], int):
            sizes = sizes[1:]  # randint(low, high, size)
        if name == "full":
            sizes = sizes[:1]
        shape = sizes[0] if len(sizes) == 1 and not isinstance(sizes[0], int) else sizes
    try:
        numel = math.prod(int(size) for size in shape)
    except (TypeError, ValueError):
        return
    dtype = kwargs.get("dtype") or (torch.int64 if name == "randint" else torch.get_default_dtype())
    nbytes = numel * dtype.itemsize
    index = device.index or 0
    if memory.allocated(index) + nbytes > memory.limit():
        memory.ooms[index] += 1
        raise memory.out_of_memory(index, nbytes)


def _four(prefix: str, values: tuple[int, int, int, int]) -> dict[str, int]:
    current, peak, allocated, freed = values
    return {
        f"{prefix}.current": current,
        f"{prefix}.peak": peak,
        f"{prefix}.allocated": allocated,
        f"{prefix}.freed": freed,
    }
