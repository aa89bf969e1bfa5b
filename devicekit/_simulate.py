"""Simulated accelerators for CPU-only test runs: `simulated_devices("cuda", 2)`.

Inside the block, a tensor "on" `cuda:1` is a real CPU tensor with a tag naming its simulated
device. A torch function mode reports the tag wherever Python code looks (`.device`, `.is_cuda`,
`.get_device()`), turns `device="cuda:1"`, `.to("cuda:1")` and `.cuda(1)` into CPU copies that
carry the tag, carries tags from operands to results, and checks every op for operands on
different devices before it runs. Autograd, optimizers and kernels only ever see CPU tensors, so
values are exactly those of the same code on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._device import DeviceContext, _device_constructors

from devicekit import _context, _discovery
from devicekit._describe import describe_tensor, labelled_tensors, op_name_at, user_call_site
from devicekit._errors import CrossDeviceError, SimulationError

__all__ = ["simulated_devices"]

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute that tags a CPU tensor with its simulated device.
_TAG = "_devicekit_simulated_device"
_SUPPORTED_TYPES = ("cuda", "xpu", "mps")
_MAX_COUNT = 16
_CPU = torch.device("cpu")
_lock = threading.Lock()


# Ops that take their index argument (position 1) as a CPU tensor on CUDA too.
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_", "_index_put_impl_"})
# Ops that copy from their source operand to wherever `self` is: never a violation.
_TRANSFERS = frozenset({"copy_", "new_tensor", "set_"})
# Tensor methods the simulation answers itself (plus the one named after the simulated type).
_SPECIAL_METHODS = frozenset(
    {"to", "cpu", "get_device", "numpy", "pin_memory", "record_stream", "__repr__", "type"}
)
# Questions about tensors, not computations: torch answers them across devices too.
# (`_parse_to` only reads `Module.to`'s arguments: its `device=` is no allocation.)
_QUERIES = frozenset(
    {"_has_compatible_shallow_copy_type", "is_same_size", "is_set_to", "_parse_to"}
)


@dataclass
class _Session:
    """One active simulation: which devices exist and which one is current."""

    type: str
    count: int
    current: int = 0
    saved: list[tuple[object, str, object]] = field(default_factory=list)

    def device(self, index: int) -> torch.device:
        return torch.device(self.type, index)

    def resolve(self, spec: object) -> torch.device | None:
        """The simulated device `spec` names, or `None` when it names no simulated device."""
        if spec is None:
            return None
        if isinstance(spec, int) and not isinstance(spec, bool):
            device = torch.device(self.type, spec)
        elif isinstance(spec, (str, torch.device)):
            device = torch.device(spec)
        else:
            return None
        if device.type != self.type:
            return None
        index = self.current if device.index is None else device.index
        if index >= self.count:
            raise SimulationError(
                f"{device}: simulated_devices({self.type!r}, {self.count}) provides only "
                f"{self.type}:0 to {self.type}:{self.count - 1}. Use one of those, or simulate "
                f"more devices with simulated_devices({self.type!r}, {index + 1})."
            )
        return torch.device(self.type, index)


_active: _Session | None = None


def _simulated(tensor: torch.Tensor) -> torch.device | None:
    """The simulated device of `tensor`, or `None` for an ordinary tensor.

    A tag counts while a simulation of its device is active: a tensor made on `cuda:1` in one
    block (a module-scoped pytest fixture, say) is on `cuda:1` again in the next block that
    simulates `cuda:1`, and an ordinary CPU tensor in between.
    """
    device: torch.device | None = tensor.__dict__.get(_TAG)
    session = _active
    if device is None or session is None:
        return None
    if device.type != session.type or (device.index or 0) >= session.count:
        return None
    return device


def _set_tag(tensor: torch.Tensor, device: torch.device | None) -> None:
    if device is None:
        tensor.__dict__.pop(_TAG, None)
    else:
        tensor.__dict__[_TAG] = device


def _device_of(tensor: torch.Tensor) -> torch.device:
    """Where `tensor` is, as the user sees it (with the mode off)."""
    simulated = _simulated(tensor)
    return tensor.device if simulated is None else simulated


def _operands(args: Sequence[object], kwargs: dict[str, object]) -> list[tuple[str, torch.Tensor]]:
    """Each tensor argument with a label, looking one level into lists and tuples."""
    found: list[tuple[str, torch.Tensor]] = []

    def visit(label: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            found.append((label, value))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    found.append((f"{label}[{index}]", item))

    for position, value in enumerate(args):
        visit(f"args[{position}]", value)
    for name, value in kwargs.items():
        visit(name, value)
    return found


def _counts(tensor: torch.Tensor) -> bool:
    """Whether a tensor takes part in the device check (0-dim CPU tensors mix freely)."""
    return _simulated(tensor) is not None or tensor.dim() > 0 or tensor.device.type != "cpu"


def _cross_device_error(
    func: Callable[..., Any] | str,
    operands: list[tuple[str, torch.Tensor]],
    call: tuple[Sequence[Any], dict[str, Any]] | None = None,
) -> CrossDeviceError:
    """The error for `func` meeting `operands` on different devices, labelled as torch names
    the arguments (`self`, `other`, `weight`) where the call's arguments are known."""
    site = user_call_site()
    op = op_name_at(func, site.line if site is not None else "") if callable(func) else str(func)
    if call is not None and callable(func):
        args, kwargs = call
        mine = [label for label, _ in _operands(args, kwargs)]
        theirs = [label for label, _ in labelled_tensors(func, tuple(args), kwargs)]
        if len(mine) == len(theirs):
            rename = dict(zip(mine, theirs, strict=True))
            operands = [(rename.get(label, label), tensor) for label, tensor in operands]
    devices: list[torch.device] = []
    for _, tensor in operands:
        device = _device_of(tensor)
        if device not in devices:
            devices.append(device)
    listed = " and ".join(str(device) for device in devices)
    lines = [f"{op}: expected all tensors on one device, but found {listed}."]
    described = tuple((label, describe_tensor(t, _device_of(t))) for label, t in operands)
    lines.extend(f"  {label}: {text}" for label, text in described)
    if site is not None:
        lines.append(f"  called from {site}")
    target = next((d for d in devices if d.type != "cpu"), devices[0])
    lines.append(
        f"Fix: create or move every operand onto {target} first, e.g. "
        f"devicekit.to_device(x, {str(target)!r}), or torch.arange(n, device=x.device) for "
        "tensors made inside forward(); 0-dim CPU tensors may mix with any device."
    )
    session = _active
    if session is not None:
        lines.append(
            f"(Devices {session.type}:0 to {session.type}:{session.count - 1} are simulated "
            "on the CPU by devicekit.simulated_devices; real hardware raises here too.)"
        )
    return CrossDeviceError(
        "\n".join(lines),
        op=op,
        operands=described,
        devices=tuple(devices),
        location=None if site is None else str(site),
    )


def _check(
    func: Callable[..., Any] | str,
    operands: list[tuple[str, torch.Tensor]],
    exempt: Callable[[str], bool],
    call: tuple[Sequence[Any], dict[str, Any]] | None = None,
) -> torch.device | None:
    """The one simulated device among `operands`, raising if they are on different devices.

    Operands `exempt` names may be CPU tensors (indices); the rest must share one device.
    """
    __tracebackhide__ = True
    found: torch.device | None = None
    simulated = False
    for label, tensor in operands:
        device = _simulated(tensor)
        if device is None:
            if not _counts(tensor) or exempt(label):
                continue
            device = tensor.device
        elif found is None:
            simulated = True
        if found is None:
            found = device
        elif device != found:
            counted = [
                (label, tensor)
                for label, tensor in operands
                if _simulated(tensor) is not None or (_counts(tensor) and not exempt(label))
            ]
            raise _cross_device_error(func, counted, call)
    return found if simulated else None


def _tag_results(result: object, device: torch.device | None, keep: set[int]) -> object:
    """Tag the tensors in `result` (not the inputs it hands back) with `device`."""
    if isinstance(result, torch.Tensor):
        if id(result) not in keep:
            _set_tag(result, device)
    elif isinstance(result, (list, tuple)):
        for item in result:
            if isinstance(item, torch.Tensor) and id(item) not in keep:
                _set_tag(item, device)
    return result


def _fresh(result: torch.Tensor, inputs: set[int]) -> torch.Tensor:
    """`result`, or a copy when torch handed back one of the inputs (`as_tensor`, `to`)."""
    return result.clone() if id(result) in inputs else result


class _SimulationMode(TorchFunctionMode):
    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.session = session

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types_: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        __tracebackhide__ = True  # pytest shows the user's line, not devicekit's internals
        kwargs = kwargs or {}
        if kwargs.get("pin_memory"):  # nothing to pin on a CPU build; the copy is the same
            kwargs = {**kwargs, "pin_memory": False}
        if type(func) is types.MethodWrapperType:
            return self._attribute(func, args)
        name = getattr(func, "__name__", "")
        if name in _QUERIES:
            return func(*args, **kwargs)
        method = bool(args) and isinstance(args[0], torch.Tensor)
        if method and (name in _SPECIAL_METHODS or name == self.session.type):
            special = self._method(func, name, args, kwargs)
            if special is not NotImplemented:
                return special
        if kwargs.get("device") is None and func in _device_constructors():
            default = _torch_default_device()
            if default is not None and self.session.resolve(default) is not None:
                kwargs = {**kwargs, "device": default}
        if "device" in kwargs:
            return self._factory(func, args, kwargs)
        if name.startswith("_foreach_"):
            return self._foreach(func, args, kwargs)
        operands = _operands(args, kwargs)
        if method and name in _TRANSFERS:
            operands = operands[:1]
        if not operands:
            return func(*args, **kwargs)
        exempt = _exemption(name) if method else _never
        device = _check(func, operands, exempt, (args, kwargs))
        result = func(*args, **kwargs)
        if device is None:
            return result
        return _tag_results(result, device, {id(tensor) for _, tensor in operands})

    def _attribute(self, func: Any, args: Sequence[Any]) -> Any:
        __tracebackhide__ = True
        name: str = func.__self__.__name__
        tensor = args[0]
        simulated = _simulated(tensor)
        if func.__name__ == "__set__":
            value = args[1]
            if name == "grad" and isinstance(value, torch.Tensor):
                grad_device = _simulated(value)
                if grad_device != simulated:
                    raise _cross_device_error(
                        "torch.Tensor.grad (assignment)", [("self", tensor), ("grad", value)]
                    )
            func(*args)
            if name == "data" and isinstance(value, torch.Tensor):
                _set_tag(tensor, _simulated(value))
            return None
        if name == "device":
            return func(*args) if simulated is None else simulated
        if name == f"is_{self.session.type}":
            return simulated is not None
        if name == "is_cpu":
            return simulated is None and func(*args)
        result = func(*args)
        if simulated is not None and isinstance(result, torch.Tensor):
            _set_tag(result, simulated)
        return result

    def _method(
        self, func: Callable[..., Any], name: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        tensor: torch.Tensor = args[0]
        if name == "to":
            return self._to(func, tensor, args[1:], kwargs)
        if name == self.session.type:
            spec = kwargs.pop("device", args[1] if len(args) > 1 else None)
            target = self.session.device(self.session.current) if spec is None else spec
            return self._to(torch.Tensor.to, tensor, (target,), kwargs)
        if name == "cpu":
            if _simulated(tensor) is None:
                return func(*args, **kwargs)
            return torch.Tensor.to(tensor, _CPU, copy=True, **kwargs)
        if name == "get_device":
            simulated = _simulated(tensor)
            return func(*args, **kwargs) if simulated is None else simulated.index
        if name == "numpy" and _simulated(tensor) is not None:
            raise TypeError(
                f"can't convert {_simulated(tensor)} device type tensor to numpy. "
                "Use Tensor.cpu() to copy the tensor to host memory first."
            )
        if name == "pin_memory" and _simulated(tensor) is None:
            # The CPU build cannot pin memory; the copy keeps what callers rely on.
            return torch.Tensor.clone(tensor)
        if name == "type" and len(args) == 1 and not kwargs and _simulated(tensor) is not None:
            spelled = str(func(*args))  # "torch.FloatTensor" names "torch.cuda.FloatTensor" there
            return spelled.replace("torch.", f"torch.{self.session.type}.", 1)
        if name == "record_stream" and _simulated(tensor) is not None:
            return None
        if name == "__repr__" and _simulated(tensor) is not None:
            with self:  # torch's printer reads `.device`: let it see the simulated one
                text: str = torch._tensor_str._str(tensor, **kwargs)  # type: ignore[no-untyped-call]
            return text
        return NotImplemented

    def _to(
        self,
        func: Callable[..., Any],
        tensor: torch.Tensor,
        rest: Sequence[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        current = _simulated(tensor)
        rest = list(rest)
        if rest and isinstance(rest[0], torch.Tensor):
            other = rest.pop(0)
            kwargs = {"device": _device_of(other), "dtype": other.dtype, **kwargs}
        spec = kwargs.pop("device", None)
        if spec is None and rest and isinstance(rest[0], (str, torch.device, int)):
            spec = rest.pop(0)
        if spec is None:  # a dtype or memory-format change: stays where it is
            result = func(tensor, *rest, **kwargs)
            return _tag_results(result, current, {id(tensor)} if result is tensor else set())
        target = self.session.resolve(spec)
        if target is None:
            real = torch.device(spec)
            if current is None:
                return func(tensor, real, *rest, **kwargs)
            kwargs["copy"] = True
            return func(tensor, real, *rest, **kwargs)
        if target == current:
            result = func(tensor, _CPU, *rest, **kwargs)
            if result is not tensor:
                _set_tag(result, target)
            return result
        kwargs["copy"] = True
        result = func(tensor, _CPU, *rest, **kwargs)
        _set_tag(result, target)
        return result

    def _factory(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        spec = kwargs["device"]
        if isinstance(spec, torch.Tensor):
            return func(*args, **kwargs)
        target = self.session.resolve(spec)
        inputs = {id(tensor) for _, tensor in _operands(args, kwargs)}
        if target is None:
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor) and _simulated(result) is not None:
                return torch.Tensor.to(result, _CPU, copy=True)
            return result
        kwargs = {**kwargs, "device": _CPU}
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            result = _fresh(result, inputs)
        return _tag_results(result, target, set())

    def _foreach(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        """`torch._foreach_*`: operands at the same list position must share a device."""
        __tracebackhide__ = True
        lists = [value for value in args if isinstance(value, (list, tuple))]
        lists = [value for value in lists if value and isinstance(value[0], torch.Tensor)]
        loose = [
            (label, tensor)
            for label, tensor in _operands(
                [a for a in args if not isinstance(a, (list, tuple))], kwargs
            )
        ]
        length = min((len(value) for value in lists), default=0)
        devices: list[torch.device | None] = []
        for position in range(length):
            operands = [
                (f"args[{number}][{position}]", value[position])
                for number, value in enumerate(lists)
                if isinstance(value[position], torch.Tensor)
            ]
            devices.append(_check(func, operands + loose, _never))
        result = func(*args, **kwargs)
        if isinstance(result, (list, tuple)):
            inputs = {id(tensor) for value in lists for tensor in value}
            for item, device in zip(result, devices, strict=False):
                if isinstance(item, torch.Tensor) and id(item) not in inputs:
                    _set_tag(item, device)
        return result


def _torch_default_device() -> object:
    """The device of `torch.set_default_device`/`with torch.device(...)`, if one is active.

    torch keeps that mode below devicekit's on the stack, so factory calls reach the simulation
    without a `device=`; the simulation applies the default itself.
    """
    for mode in reversed(_get_current_function_mode_stack()):  # type: ignore[no-untyped-call]
        if isinstance(mode, DeviceContext):
            return mode.device
    return None


def _never(label: str) -> bool:
    return False


@functools.cache
def _exemption(name: str) -> Callable[[str], bool]:
    if name in _INDEXING:
        return lambda label: not label.startswith("args[0]")
    return _never


class _FakeEvent:
    """An event on a simulated device: work on the CPU is done when it returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: object = None) -> None:
        return None

    def wait(self, stream: object = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class _FakeStream:
    """A stream on a simulated device: everything already ran, in order, on the CPU."""

    def __init__(self, device: object = None, *args: Any, **kwargs: Any) -> None:
        session = _active
        self.device = session.resolve(device) if session is not None else None
        if self.device is None and session is not None:
            self.device = session.device(session.current)

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return False

    def wait_stream(self, stream: object) -> None:
        return None

    def wait_event(self, event: object) -> None:
        return None

    def record_event(self, event: _FakeEvent | None = None) -> _FakeEvent:
        return event if event is not None else _FakeEvent()

    def __enter__(self) -> _FakeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _patches(session: _Session) -> dict[tuple[object, str], object]:
    """Every torch attribute the simulation replaces, with its replacement."""
    kind = session.type
    module = getattr(torch, kind)

    def index_of(device: object = None) -> int:
        if device is None:
            return session.current
        if isinstance(device, int):
            resolved = session.resolve(device)
        else:
            resolved = session.resolve(getattr(device, "device", device))
        if resolved is None or resolved.index is None:
            raise SimulationError(f"{device!r} is not a simulated {kind} device")
        return resolved.index

    def set_device(device: object) -> None:
        session.current = index_of(device)

    def exchange(device: int) -> int:
        previous = session.current
        if device >= 0:
            session.current = index_of(device)
        return previous

    def synchronize(device: object = None) -> None:
        index_of(device)

    def device_name(device: object = None) -> str:
        return f"simulated {kind}:{index_of(device)}"

    def generic(original: Callable[..., Any], fake: Callable[..., Any]) -> Callable[..., Any]:
        """`torch.Event`/`torch.Stream`: fakes for simulated devices, real ones otherwise."""

        def make(*args: Any, **kwargs: Any) -> Any:
            device = kwargs.get("device", args[0] if args else None)
            if device is None or session.resolve(device) is not None:
                return fake(device)
            return original(*args, **kwargs)

        return make

    accelerator = torch.accelerator
    patches: dict[tuple[object, str], object] = {
        (torch, "Event"): generic(torch.Event, _FakeEvent),
        (torch, "Stream"): generic(torch.Stream, _FakeStream),
        (accelerator, "current_accelerator"): lambda check_available=False: torch.device(kind),
        (accelerator, "device_count"): lambda: session.count,
        (accelerator, "is_available"): lambda: True,
        (accelerator, "current_device_index"): lambda: session.current,
        (accelerator, "set_device_index"): set_device,
        (accelerator, "synchronize"): synchronize,
        (accelerator, "current_stream"): lambda device=None: _FakeStream(device),
    }
    for name, value in (
        ("is_available", lambda: True),
        ("device_count", lambda: session.count),
        ("current_device", lambda: session.current),
        ("set_device", set_device),
        ("synchronize", synchronize),
        ("current_stream", lambda device=None: _FakeStream(device)),
        ("default_stream", lambda device=None: _FakeStream(device)),
        ("Stream", _FakeStream),
        ("Event", _FakeEvent),
        ("stream", lambda stream: stream if stream is not None else contextlib.nullcontext()),
        ("set_stream", lambda stream: None),
        ("get_device_name", device_name),
        ("_exchange_device", exchange),
        ("_maybe_exchange_device", exchange),
    ):
        if hasattr(module, name):
            patches[(module, name)] = value
    if kind == "cuda":
        patches[(torch.backends.cudnn, "is_acceptable")] = lambda tensor: False
    # DataLoader(pin_memory=True) pins in its own thread, where the mode is not active: the
    # CPU build cannot pin, and a plain copy is what the simulated device needs.
    patches[(torch.Tensor, "pin_memory")] = _pinned_copy
    for cls in (torch.nn.Parameter, torch.nn.Buffer):
        patches[(cls, "__new__")] = staticmethod(_keeping_tag(cls.__dict__["__new__"]))
    return patches


def _pinned_copy(tensor: torch.Tensor, device: object = None) -> torch.Tensor:
    """`Tensor.pin_memory` while simulating: a copy, since a CPU build has no pinned memory."""
    return torch.Tensor.clone(tensor)


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


def _really_has(device_type: str) -> bool:
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type == device_type:
        return True
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    return bool(callable(is_available) and is_available())


def _real_count(device_type: str) -> int:
    """How many `device_type` devices the machine really has (the simulated ones not counted)."""
    session = _active
    if session is not None and session.type == device_type:
        return 0
    if not _really_has(device_type):
        return 0
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type == device_type:
        return int(torch.accelerator.device_count())
    count = getattr(getattr(torch, device_type, None), "device_count", None)
    return int(count()) if callable(count) else 1


class simulated_devices:
    """Pretend this CPU-only machine has `count` accelerators of `type`, for tests.

    Inside the block, tensors created on or moved to `cuda:0` ... `cuda:{count-1}` live in CPU
    memory and compute real values, but report the simulated device everywhere: `.device`,
    `.is_cuda`, `.get_device()`, `devicekit.devices_of`. An op that mixes two simulated
    devices, or a simulated device with a non-scalar CPU tensor, raises `CrossDeviceError`, as
    real hardware would, including the ops torch leaves unchecked. 0-dim CPU tensors mix freely
    and index tensors may stay on the CPU, as on CUDA. `torch.cuda.is_available()`,
    `device_count()`, `current_device()`, `set_device()`, `synchronize()` and
    `torch.accelerator` answer for the simulated devices, and `devicekit.devices()` lists them
    with `simulated=True`.

    Usable as a context manager or a decorator. The torch function mode is active in the
    thread that entered the block only; the patched `torch.cuda` functions are process-wide.
    Everything is restored on exit, exceptions included. Tensors made inside the block are
    ordinary CPU tensors after it (and report their simulated device again in a later block
    that simulates it).

    Args:
        type: The device type to simulate: `"cuda"` (the default), `"xpu"` or `"mps"`.
        count: How many devices, from 1 to 16.

    Raises:
        SimulationError: The machine really has that device type, another simulation is
            active, or the type or count is not supported. Inside the block, moving to an
            index beyond `count` raises it too.

    Example:
        Simulating two XPUs (this example also runs on CUDA machines, where simulating
        `"cuda"`, the default, is refused):

        >>> import torch, devicekit
        >>> with devicekit.simulated_devices("xpu", 2):
        ...     x = torch.ones(2, device="xpu:1")
        ...     print(x.device, x.is_xpu, torch.xpu.device_count(), (x * 2).tolist())
        xpu:1 True 2 [2.0, 2.0]
    """

    def __init__(self, type: str = "cuda", count: int = 2) -> None:
        if type not in _SUPPORTED_TYPES:
            raise SimulationError(
                f"simulated_devices({type!r}, {count!r}): cannot simulate {type!r}. "
                f"Supported types: {', '.join(map(repr, _SUPPORTED_TYPES))}."
            )
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_COUNT:
            raise SimulationError(
                f"simulated_devices({type!r}, {count!r}): count must be an integer from 1 "
                f"to {_MAX_COUNT}."
            )
        self.type = type
        self.count = count
        self._mode: _SimulationMode | None = None

    def __repr__(self) -> str:
        return f"simulated_devices({self.type!r}, {self.count})"

    def __enter__(self) -> list[torch.device]:
        global _active
        with _lock:
            if _active is not None:
                raise SimulationError(
                    f"{self!r}: simulated_devices({_active.type!r}, {_active.count}) is already "
                    "active. Simulations do not nest; exit the outer block first."
                )
            if _really_has(self.type):
                raise SimulationError(
                    f"{self!r}: this machine really has {self.type} devices, so devicekit will "
                    f"not simulate them. Run on the real devices instead "
                    f"(devicekit.devices() lists them)."
                )
            # torch imports dynamo lazily (the first optimizer does); importing it inside the
            # block would capture the patched `torch.cuda` and `torch.Event` for good.
            import torch._dynamo  # noqa: F401

            session = _Session(self.type, self.count)
            try:
                for (owner, name), value in _patches(session).items():
                    session.saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
                    setattr(owner, name, value)
                _discovery._SIMULATED[:] = [
                    _discovery.DeviceInfo(
                        session.device(index),
                        self.type,
                        index,
                        f"simulated {self.type}:{index}",
                        simulated=True,
                    )
                    for index in range(self.count)
                ]
                _context._auto_cache.clear()
                _active = session
                self._mode = _SimulationMode(session)
                self._mode.__enter__()  # type: ignore[no-untyped-call]
            except BaseException:
                _restore(session)
                raise
        return [session.device(index) for index in range(self.count)]

    def __exit__(self, *exc: object) -> None:
        global _active
        mode, self._mode = self._mode, None
        with _lock:
            session = _active
            try:
                if mode is not None:
                    mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            finally:
                _active = None
                if session is not None:
                    _restore(session)

    def __call__(self, function: F) -> F:
        """Use as a decorator: each call of `function` runs inside a fresh simulation."""

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with simulated_devices(self.type, self.count):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


_MISSING = object()


def _restore(session: _Session) -> None:
    while session.saved:
        owner, name, value = session.saved.pop()
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _discovery._SIMULATED.clear()
    _context._auto_cache.clear()


def _active_devices() -> Iterator[torch.device]:
    """The simulated devices of the active simulation, if any."""
    session = _active
    if session is not None:
        yield from (session.device(index) for index in range(session.count))
