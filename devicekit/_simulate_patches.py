"""The torch attributes a simulation replaces while it is active: `torch.cuda.*` (or the
simulated type's module), `torch.accelerator`, `torch.Stream`/`torch.Event`, `torch.Generator`,
the legacy `torch.cuda.FloatTensor` types, checkpoint locations, pinning and
`Parameter.__new__`.

Every public function of `torch.cuda` answers as on a real GPU with the simulated device's facts
(`_simulate_facts`), memory use, generators (`_simulate_rng`) and streams
(`_simulate_streams`), or raises `SimulationError` naming itself and what to do instead (the
`_UNSIMULATED` table); docs/simulation-surface.md lists them all.

Every replacement that may be captured by a library imported during the simulation (TorchDynamo
builds tables of torch functions on import) answers for the simulation only while its session
is the active one, and calls the original otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.backends.cuda
import torch.backends.cudnn
import torch.utils.checkpoint

from devicekit import (
    _backward,
    _simulate_compile,
    _simulate_facts,
    _simulate_mode,
    _simulate_parallel,
    _simulate_rng,
    _simulate_streams,
    _simulate_threads,
)
from devicekit._errors import SimulationError
from devicekit._simulate_checkpoint import checkpoint_patches
from devicekit._simulate_facts import DEFAULT_FACTS, DeviceFacts, DeviceProperties, Memory
from devicekit._simulate_mode import _Session, _set_tag, _simulated
from devicekit._simulate_rng import Generators
from devicekit._simulate_streams import SimulatedEvent, SimulatedStream, Streams

_function_modes: Callable[[], list[Any]] = torch.overrides._get_current_function_mode_stack

__all__ = ["UNSIMULATED", "_patches"]

#: Public `torch.cuda` names a CPU cannot stand in for, with what to do instead.
UNSIMULATED: dict[str, str] = {
    "cudart": "call CUDA runtime functions only on a real GPU (skip them when simulating)",
    "current_blas_handle": "use cuBLAS handles only on a real GPU",
    "current_solver_handle": "use cuSOLVER handles only on a real GPU",
    "caching_allocator_alloc": "allocate with torch.empty(..., device='cuda') instead",
    "caching_allocator_delete": "free by dropping the tensor instead",
    "memory_snapshot": "read torch.cuda.memory_stats() instead",
    "get_allocator_backend": "the simulation has no CUDA allocator; read memory_stats()",
    "CUDAGraph": "run the captured code eagerly when simulating",
    "graph": "run the captured code eagerly when simulating",
    "graph_pool_handle": "run the captured code eagerly when simulating",
    "make_graphed_callables": "call the callables directly when simulating",
    "MemPool": "allocate with the default allocator when simulating",
    "use_mem_pool": "allocate with the default allocator when simulating",
    "CUDAPluggableAllocator": "keep the default allocator when simulating",
    "change_current_allocator": "keep the default allocator when simulating",
    "ExternalStream": "use torch.cuda.Stream() when simulating",
    "get_stream_from_external": "use torch.cuda.Stream() when simulating",
    "GreenContext": "run on the whole simulated device",
    "clock_rate": "NVML is not simulated; read get_device_properties() instead",
    "temperature": "NVML is not simulated; skip hardware telemetry when simulating",
    "power_draw": "NVML is not simulated; skip hardware telemetry when simulating",
    "utilization": "NVML is not simulated; skip hardware telemetry when simulating",
    "memory_usage": "NVML is not simulated; read torch.cuda.memory_allocated() instead",
}
_STORAGE_NAMES = (
    "BFloat16Storage",
    "BoolStorage",
    "ByteStorage",
    "CharStorage",
    "ComplexDoubleStorage",
    "ComplexFloatStorage",
    "DoubleStorage",
    "FloatStorage",
    "HalfStorage",
    "IntStorage",
    "LongStorage",
    "ShortStorage",
)
#: The legacy tensor types (`torch.cuda.FloatTensor`) and their dtypes.
LEGACY_TYPES: dict[str, torch.dtype] = {
    "BFloat16Tensor": torch.bfloat16,
    "BoolTensor": torch.bool,
    "ByteTensor": torch.uint8,
    "CharTensor": torch.int8,
    "DoubleTensor": torch.float64,
    "FloatTensor": torch.float32,
    "HalfTensor": torch.float16,
    "IntTensor": torch.int32,
    "LongTensor": torch.int64,
    "ShortTensor": torch.int16,
}
_TORCH_TYPE = torch._C.TensorBase.type
_REAL_STREAM = torch.Stream
_REAL_EVENT = torch.Event


class _Hardware:
    """What one simulation keeps for its whole life (also while paused by another one)."""

    def __init__(self, session: _Session, facts: DeviceFacts) -> None:
        self.facts = facts
        self.memory = Memory(session.type, session.count, facts.total_memory)
        self.generators = Generators(session.type, session.count)
        self.streams = Streams(session.count)
        self.sync_debug_mode = 0


def _hardware(session: _Session) -> _Hardware:
    state: dict[str, Any] = vars(session)
    hardware: _Hardware | None = state.get("_devicekit_hardware")
    if hardware is None:
        facts = getattr(session.owner, "facts", None)
        hardware = _Hardware(session, facts if isinstance(facts, DeviceFacts) else DEFAULT_FACTS)
        state["_devicekit_hardware"] = hardware
    return hardware


def _patches(session: _Session) -> dict[tuple[object, str], object]:
    """Every torch attribute the simulation replaces, with its replacement."""
    kind = session.type
    module = getattr(torch, kind)
    hardware = _hardware(session)
    facts, memory, generators, streams = (
        hardware.facts,
        hardware.memory,
        hardware.generators,
        hardware.streams,
    )

    def index_of(device: object = None) -> int:
        if device is None:
            return session.current
        if isinstance(device, int) and not isinstance(device, bool):
            resolved = session.resolve(device)
        elif isinstance(device, str) and device == kind:
            return session.current
        else:
            resolved = session.resolve(getattr(device, "device", device))
            if resolved is None and getattr(device, "idx", None) is not None:
                resolved = session.resolve(device.idx)  # type: ignore[attr-defined]
        if resolved is None or resolved.index is None:
            raise SimulationError(
                f"{device!r} is not a simulated {kind} device: simulated_devices({kind!r}, "
                f"{session.count}) provides {kind}:0 to {kind}:{session.count - 1}."
            )
        return resolved.index

    def set_device(device: object) -> None:
        if isinstance(device, int) and device < 0:
            return  # torch.cuda.set_device(-1) is a no-op, as on CUDA
        session.current = index_of(device)

    def exchange(device: int) -> int:
        previous = session.current
        if device >= 0:
            session.current = index_of(device)
        return previous

    def synchronize(device: object = None) -> None:
        streams.synchronize(index_of(device))  # lands non_blocking copies under races=True

    def stream_of(device: object = None) -> SimulatedStream:
        return streams.current_of(index_of(device))

    def set_stream(stream: object) -> None:
        if isinstance(stream, SimulatedStream):
            streams.set(stream)

    def stream(stream: object = None) -> _StreamContext:
        return _StreamContext(stream)

    # --- memory --------------------------------------------------------------------------------
    def stat(key: str) -> Callable[..., int]:
        def read(device: object = None) -> int:
            return memory.stats(index_of(device)).get(key, 0)

        return read

    def memory_stats(device: object = None) -> Any:
        return memory.stats(index_of(device))

    def nested_stats(device: object = None) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for key, value in memory.stats(index_of(device)).items():
            *path, last = key.split(".")
            level = nested
            for part in path:
                level = level.setdefault(part, {})
            level[last] = value
        return nested

    def mem_get_info(device: object = None) -> tuple[int, int]:
        index = index_of(device)
        return memory.limit() - memory.allocated(index), memory.limit()

    def reset_peak(device: object = None) -> None:
        memory.reset_peak(index_of(device))

    def reset_accumulated(device: object = None) -> None:
        memory.reset_accumulated(index_of(device))

    def set_memory_fraction(fraction: float, device: object = None) -> None:
        index_of(device)
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        memory.fraction = fraction

    def list_processes(device: object = None) -> str:
        index = index_of(device)
        used = memory.allocated(index) / 2**20
        return f"GPU:{index}\nprocess (this one, simulated) uses {used:.3f} MB GPU memory"

    # --- random numbers ------------------------------------------------------------------------
    def get_rng_state(device: object = kind) -> torch.Tensor:
        return generators.get_state(index_of(device))

    def set_rng_state(new_state: torch.Tensor, device: object = kind) -> None:
        generators.set_state(index_of(device), new_state)

    def manual_seed(seed: int) -> None:
        generators.manual_seed(session.current, seed)

    def seed() -> None:
        generators.seed(session.current)

    def initial_seed() -> int:
        return generators.all[session.current].initial_seed()

    def capability(device: object = None) -> tuple[int, int]:
        index_of(device)
        return facts.capability

    def properties(device: object = None) -> DeviceProperties:
        return DeviceProperties(facts, index_of(device))

    def device_name(device: object = None) -> str:
        index_of(device)
        return facts.name

    def bf16_supported(including_emulation: bool = True) -> bool:
        return facts.bf16 or bool(including_emulation)

    def set_sync_debug_mode(debug_mode: int | str) -> None:
        modes = {"default": 0, "warn": 1, "error": 2}
        hardware.sync_debug_mode = modes[debug_mode] if isinstance(debug_mode, str) else debug_mode

    def can_access_peer(device: object, peer_device: object) -> bool:
        return index_of(device) != index_of(peer_device)

    arch = f"sm_{facts.capability[0]}{facts.capability[1]}"
    replacements: dict[str, object] = {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "init": lambda: None,
        "_lazy_init": _simulate_threads.lazy_init(session),
        "ipc_collect": lambda: None,
        "device_count": lambda: session.count,
        "current_device": lambda: session.current,
        "set_device": set_device,
        "_exchange_device": exchange,
        "_maybe_exchange_device": exchange,
        "synchronize": synchronize,
        "get_device_name": device_name,
        "get_device_capability": capability,
        "get_device_properties": properties,
        "is_bf16_supported": bf16_supported,
        "is_tf32_supported": lambda: facts.capability >= (8, 0),
        "get_arch_list": lambda: [arch],
        "get_gencode_flags": lambda: f"-gencode compute=compute_{arch[3:]},code={arch}",
        "can_device_access_peer": can_access_peer,
        "get_sync_debug_mode": lambda: hardware.sync_debug_mode,
        "set_sync_debug_mode": set_sync_debug_mode,
        "is_current_stream_capturing": lambda: False,
        "Stream": SimulatedStream,
        "Event": SimulatedEvent,
        "StreamContext": _StreamContext,
        "current_stream": stream_of,
        "default_stream": lambda device=None: streams.default(index_of(device)),
        "set_stream": set_stream,
        "stream": stream,
        "memory_stats": memory_stats,
        "memory_stats_as_nested_dict": nested_stats,
        "memory_allocated": stat("allocated_bytes.all.current"),
        "max_memory_allocated": stat("allocated_bytes.all.peak"),
        "memory_reserved": stat("reserved_bytes.all.current"),
        "max_memory_reserved": stat("reserved_bytes.all.peak"),
        "memory_cached": stat("reserved_bytes.all.current"),
        "max_memory_cached": stat("reserved_bytes.all.peak"),
        "device_memory_used": stat("reserved_bytes.all.current"),
        "mem_get_info": mem_get_info,
        "reset_peak_memory_stats": reset_peak,
        "reset_max_memory_allocated": reset_peak,
        "reset_max_memory_cached": reset_peak,
        "reset_accumulated_memory_stats": reset_accumulated,
        "host_memory_stats": lambda: OrderedDict(),
        "host_memory_stats_as_nested_dict": dict,
        "caching_allocator_enable": lambda value=True: None,
        "caching_allocator_disabled": contextlib.nullcontext,
        "reset_peak_host_memory_stats": lambda: None,
        "reset_accumulated_host_memory_stats": lambda: None,
        "empty_cache": lambda: None,
        "get_per_process_memory_fraction": lambda device=None: memory.fraction,
        "set_per_process_memory_fraction": set_memory_fraction,
        "list_gpu_processes": list_processes,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "get_rng_state_all": generators.get_state_all,
        "set_rng_state_all": generators.set_state_all,
        "manual_seed": manual_seed,
        "manual_seed_all": generators.manual_seed_all,
        "seed": seed,
        "seed_all": generators.seed_all,
        "initial_seed": initial_seed,
        "default_generators": generators.all,
    }
    for name, advice in UNSIMULATED.items():
        original = getattr(module, name, None)
        replacements[name] = (
            _refusing_class(original, f"torch.{kind}.{name}", advice)
            if isinstance(original, type)
            else _refuse(f"torch.{kind}.{name}", advice)
        )
    for name in _STORAGE_NAMES:
        if isinstance(getattr(module, name, None), type):
            replacements[name] = _refusing_class(
                getattr(module, name),
                f"torch.{kind}.{name}",
                "make tensors with torch.empty(..., device=...) and use their storage",
            )
    for name, dtype in LEGACY_TYPES.items():
        if hasattr(module, name):
            replacements[name] = _legacy_type(session, name, dtype)

    patches: dict[tuple[object, str], object] = {}
    for name, value in replacements.items():
        if hasattr(module, name):  # torch.xpu and torch.mps have fewer functions than torch.cuda
            for owner in _holders(module, name):
                patches[(owner, name)] = value

    accelerator = torch.accelerator
    for name, value in {
        "current_accelerator": lambda check_available=False: torch.device(kind),
        "device_count": lambda: session.count,
        "is_available": lambda: True,
        "current_device_index": lambda: session.current,
        "current_device_idx": lambda: session.current,
        "set_device_index": set_device,
        "set_device_idx": set_device,
        "device_index": _DeviceIndex,
        "synchronize": synchronize,
        "current_stream": stream_of,
        "set_stream": set_stream,
        "get_device_capability": lambda device=None: {
            "supported_dtypes": _SUPPORTED_DTYPES if facts.bf16 else _SUPPORTED_DTYPES_NO_BF16
        },
        "empty_cache": lambda: None,
        "empty_host_cache": lambda: None,
        "memory_stats": memory_stats,
        "memory_allocated": stat("allocated_bytes.all.current"),
        "max_memory_allocated": stat("allocated_bytes.all.peak"),
        "memory_reserved": stat("reserved_bytes.all.current"),
        "max_memory_reserved": stat("reserved_bytes.all.peak"),
        "reset_peak_memory_stats": reset_peak,
        "reset_accumulated_memory_stats": reset_accumulated,
        "get_memory_info": mem_get_info,
        "Graph": _refusing_class(
            accelerator.Graph, "torch.accelerator.Graph", "run the captured code eagerly"
        ),
    }.items():
        for owner in _holders(accelerator, name):
            patches[(owner, name)] = value

    patches[(torch, "Event")] = _facade(_REAL_EVENT, SimulatedEvent, session)
    patches[(torch, "Stream")] = _facade(_REAL_STREAM, SimulatedStream, session)
    patches[(torch, "Generator")] = _simulate_rng.generator_class(session.resolve)
    patches[(torch.Tensor, "type")] = _tensor_type(session)
    if kind == "cuda":
        patches[(torch.backends.cudnn, "is_acceptable")] = lambda tensor: False
        patches[(torch.backends.cudnn, "is_available")] = lambda: True
        patches[(torch.backends.cudnn, "version")] = lambda: 90100
        patches[(torch.version, "cuda")] = "12.8"
        nvtx = getattr(torch.cuda, "nvtx", None)
        if nvtx is not None:
            patches[(nvtx, "_nvtx")] = _NoNvtx()
    # Pinning (also in a DataLoader's pin-memory thread), subclasses, vmap: `_simulate_mode`.
    patches.update(_simulate_mode.tensor_patches(session))
    for cls in (torch.nn.Parameter, torch.nn.Buffer):
        patches[(cls, "__new__")] = staticmethod(_keeping_tag(cls.__dict__["__new__"]))
    patches.update(checkpoint_patches(session, memory))
    if hasattr(module, "_initialized"):  # read directly by torch.utils.checkpoint, as CUDA's
        patches[(module, "_initialized")] = True
    patches[(torch.utils.checkpoint, "set_device_states")] = _recomputing(
        session, torch.utils.checkpoint.set_device_states
    )
    patches.update(_simulate_parallel.patches(kind))  # nn.parallel.comm: DataParallel, replicate
    patches.update(_simulate_compile.patches())  # torch.compile
    # Backward passes: the engine runs under the mode, gradients reach Python code tagged.
    patches.update(_backward.gradient_patches(_simulated, _set_tag))
    patches[(_backward.holders, "simulation")] = session
    # The mode's hooks find this simulation's memory, generators and streams here.
    patches[(_simulate_facts, "active")] = memory
    patches[(_simulate_rng, "active")] = generators
    patches[(_simulate_streams, "active")] = streams
    return {
        (owner, name): _while_active(session, _own(owner, name), value)
        for (owner, name), value in patches.items()
    }


_SUPPORTED_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
_SUPPORTED_DTYPES_NO_BF16 = _SUPPORTED_DTYPES - {torch.bfloat16}


def _own(owner: object, name: str) -> object:
    return vars(owner).get(name)


def _holders(module: types.ModuleType, name: str) -> Iterable[object]:
    """`module` and each of its submodules that binds `name` to the same object (torch.cuda
    re-exports `torch.cuda.memory.memory_stats`; torch's own callers use the submodule's)."""
    original = vars(module).get(name)
    yield module
    if original is None:
        return
    prefix = module.__name__ + "."
    for value in list(vars(module).values()):
        if (
            isinstance(value, types.ModuleType)
            and value.__name__.startswith(prefix)
            and vars(value).get(name) is original
        ):
            yield value


def _refuse(name: str, advice: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise SimulationError(
            f"{name}() is not simulated: it needs a real GPU. Instead, {advice}. "
            "(Inside devicekit.simulated_devices the devices are CPU memory.)"
        )

    refused.__name__ = name.rpartition(".")[2]
    return refused


def _refusing_class(original: type, name: str, advice: str) -> type:
    """A subclass of `original` (so annotations and `isinstance` work) that cannot be made."""

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        _refuse(name, advice)()

    def __init__(self: object, *args: Any, **kwargs: Any) -> None:
        _refuse(name, advice)()

    return type(original)(
        original.__name__,
        (original,),
        {"__new__": __new__, "__init__": __init__, "__module__": original.__module__},
    )


class _NoNvtx:
    """NVTX ranges and marks: accepted and dropped (no profiler watches a simulated device)."""

    def __init__(self) -> None:
        self.depth = 0
        self.ids = 0

    def rangePushA(self, message: str) -> int:
        self.depth += 1
        return self.depth - 1

    def rangePop(self) -> int:
        self.depth = max(self.depth - 1, 0)
        return self.depth

    def rangeStartA(self, message: str) -> int:
        self.ids += 1
        return self.ids

    def rangeEnd(self, range_id: int) -> None:
        return None

    def markA(self, message: str) -> None:
        return None

    def deviceRangeStart(self, message: str, stream: int = 0) -> object:
        return object()

    def deviceRangeEnd(self, handle: object, stream: int = 0) -> None:
        return None


class _StreamContext:
    """`torch.cuda.stream(s)`: makes `s` current, and its device the current device."""

    def __init__(self, stream: object) -> None:
        self.stream = stream

    def __enter__(self) -> object:
        if isinstance(self.stream, SimulatedStream):
            self.stream.__enter__()
        return self.stream

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.stream, SimulatedStream):
            self.stream.__exit__(*exc)


class _DeviceIndex:
    """`torch.accelerator.device_index(i)`: `i` is the current device inside the block."""

    def __init__(self, device: object, /) -> None:
        self.device = device
        self.previous: int | None = None

    def __enter__(self) -> None:
        session = _simulate_mode._active
        if self.device is not None and session is not None:
            self.previous = session.current
            simulated = session.resolve(self.device)
            if simulated is not None and simulated.index is not None:
                session.current = simulated.index

    def __exit__(self, *exc: object) -> None:
        session = _simulate_mode._active
        if self.previous is not None and session is not None:
            session.current = self.previous


class _FacadeType(type):
    """`isinstance(s, torch.Stream)` stays true for every real and simulated stream."""

    _devicekit_real: type

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, cls._devicekit_real)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, cls._devicekit_real)


def _facade(original: type, simulated: type, session: _Session) -> type:
    """`torch.Stream`/`torch.Event`: the simulated kind for simulated devices, the real one
    otherwise. A class (a subclass of the original), so that code subclassing it while the
    simulation is active (TorchDynamo's device interfaces, on import) still gets a class."""

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        # Both take the device first: `torch.Stream(device=None, *, priority=0)`,
        # `torch.Event(device=None, *, enable_timing=False, ...)`.
        device = kwargs.pop("device", args[0] if args else None)
        if _simulate_mode._active is session and (
            device is None or session.resolve(device) is not None
        ):
            return simulated(device=device, **kwargs)
        return original.__new__(cls, device, **kwargs)

    facade = _FacadeType(
        original.__name__, (original,), {"__new__": __new__, "__module__": "torch"}
    )
    facade._devicekit_real = original
    return facade


def _legacy_type(session: _Session, name: str, dtype: torch.dtype) -> type:
    """`torch.cuda.FloatTensor`: builds tensors on the current simulated device, and matches
    simulated tensors of its dtype in `isinstance`."""
    cpu_type = getattr(torch, name)

    class _Legacy(type):
        def __instancecheck__(cls, instance: object) -> bool:
            return (
                isinstance(instance, torch.Tensor)
                and instance.dtype == dtype
                and _simulated(instance) is not None
            )

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            device = kwargs.pop("device", None)
            target = session.resolve(device) or session.device(session.current)
            made = cpu_type(*args, **kwargs)
            _set_tag(made, target)
            return made

    return _Legacy(
        name, (), {"__module__": f"torch.{session.type}", "dtype": dtype, "is_cuda": True}
    )


def _tensor_type(session: _Session) -> Callable[..., Any]:
    """`Tensor.type(torch.cuda.HalfTensor)` and `Tensor.type("torch.cuda.HalfTensor")`."""
    prefix = f"torch.{session.type}."

    def type_(
        self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
    ) -> Any:
        if dtype is None or not isinstance(dtype, (str, type)):
            return _TORCH_TYPE(self) if dtype is None else _TORCH_TYPE(self, dtype, non_blocking)
        spelled = dtype if isinstance(dtype, str) else f"{dtype.__module__}.{dtype.__name__}"
        if spelled.startswith(prefix) and spelled[len(prefix) :] in LEGACY_TYPES:
            target = session.resolve(self.device) or session.device(session.current)
            wanted = LEGACY_TYPES[spelled[len(prefix) :]]
            return self.to(target, wanted, non_blocking=non_blocking)
        if spelled.startswith("torch.") and spelled[6:] in LEGACY_TYPES:
            return self.to("cpu", LEGACY_TYPES[spelled[6:]], non_blocking=non_blocking)
        return _TORCH_TYPE(self, dtype, non_blocking, **kwargs)  # type: ignore[arg-type]

    type_.__name__ = type_.__qualname__ = "type"  # the mode's handlers go by torch's name
    return type_


def _while_active(session: _Session, original: object, fake: object) -> object:
    """`fake` while `session` is the active simulation, `original` at any other time.

    A library imported inside the block may keep a reference to the fake for good (TorchDynamo
    builds tables of torch functions on import); after the block such a reference behaves as
    the original did.
    """
    if not isinstance(fake, types.FunctionType) or not callable(original):
        return fake
    answer: Callable[..., Any] = fake
    real: Callable[..., Any] = original

    def switch(*args: Any, **kwargs: Any) -> Any:
        if _simulate_mode._active is session:
            return answer(*args, **kwargs)
        return real(*args, **kwargs)

    return functools.update_wrapper(switch, real, updated=())


def _recomputing(session: _Session, original: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.utils.checkpoint.set_device_states`, called before a checkpointed region is
    recomputed in backward. torch's autograd engine runs that recomputation without the
    simulation's mode (backward runs with the stack `backward()` was called with, and the mode
    pops itself while it runs `backward()`), so its random ops draw from the CPU's generator:
    that generator gets the simulated device's saved state, the one the forward drew from, and
    dropout masks come out the same, as on CUDA. `fork_rng` restores the CPU's state after."""

    def set_device_states(devices: Any, states: Any, *, device_type: Any = None) -> None:
        original(devices, states, device_type=device_type)
        mode = session.mode
        if (
            (device_type or session.type) == session.type
            and len(states) > 0
            and not any(m is mode for m in _function_modes())
        ):
            torch.default_generator.set_state(states[0])

    return set_device_states


def _keeping_tag(new: Any) -> Callable[..., Any]:
    """Wrap `Parameter.__new__`: the new parameter is where its data is."""
    function = new.__func__ if isinstance(new, staticmethod) else new

    @functools.wraps(function)
    def wrapper(cls: type, data: Any = None, *args: Any, **kwargs: Any) -> Any:
        made = function(cls, data, *args, **kwargs)
        if isinstance(data, torch.Tensor) and made is not data:
            _set_tag(made, _simulated(data))
        return made

    return wrapper
