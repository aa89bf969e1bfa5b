"""What a simulated device looks like to torch code: the session, the tags, and the mode.

Inside `devicekit.simulated_devices`, a tensor "on" `cuda:1` is a real CPU tensor with a tag
naming its simulated device. `_SimulationMode`, a torch function mode, reports the tag wherever
Python code looks (`.device`, `.is_cuda`, `.get_device()`), turns `device="cuda:1"`,
`.to("cuda:1")` and `.cuda(1)` into CPU copies that carry the tag, carries tags from operands to
results, and checks every op for operands on different devices before it runs. It sends each
call to one named handler; the patches of `torch.cuda` and friends are in `_simulate_patches`.
"""

from __future__ import annotations

import functools
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._device import DeviceContext, _device_constructors

from devicekit import _provenance, _simulate_facts, _simulate_rng
from devicekit._describe import (
    labelled_tensors,
    op_name_at,
    user_call_site,
)
from devicekit._errors import CrossDeviceError, SimulationError
from devicekit._report import Report

__all__ = ["_Session", "_SimulationMode", "_simulated"]

#: The attribute that tags a CPU tensor with its simulated device.
_TAG = "_devicekit_simulated_device"
_CPU = torch.device("cpu")
_Uninitialized: type = torch.nn.parameter.UninitializedTensorMixin  # type: ignore[attr-defined]


# Ops that take their index argument (position 1) as a CPU tensor on CUDA too.
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_", "_index_put_impl_"})
# torch's own arguments of a jagged nested tensor's view that never live with its data: a
# `meta` dummy and CPU-held sequence lengths.
_NESTED_AUXILIARY = frozenset(
    {"args[2]", "args[5]", "args[6]", "dummy", "min_seqlen", "max_seqlen"}
)
# Ops that copy from their source operand to wherever `self` is: never a violation.
_TRANSFERS = frozenset({"copy_", "new_tensor", "set_"})
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
    saved: list[tuple[object, str, object]] = field(default_factory=list)
    #: The current device index of each thread, as CUDA keeps it (a new thread starts on 0).
    threads: threading.local = field(default_factory=threading.local, repr=False)
    #: The `simulated_devices` object that entered it, its mode, and the thread's mode users.
    owner: object = None
    mode: TorchFunctionMode | None = None
    users: Any = None

    @property
    def current(self) -> int:
        """The calling thread's current device index (`torch.cuda.set_device` sets it)."""
        current: int = getattr(self.threads, "current", 0)
        return current

    @current.setter
    def current(self, index: int) -> None:
        self.threads.current = index

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
_METHOD_WRAPPER = types.MethodWrapperType  # a tensor attribute's `__get__`/`__set__`
_subclasses_enabled = torch._C._is_torch_function_enabled
_DEFAULT_TORCH_FUNCTION = torch.Tensor.__torch_function__.__func__  # type: ignore[attr-defined]
#: What `nn.Parameter` (and `nn.Buffer`) use: run the op with subclass handling off. It does
#: nothing the mode needs to see first, so the mode handles such ops in one pass, not two.
_DISABLED_TORCH_FUNCTION = torch._C._disabled_torch_function_impl
#: Whether each type that overrides `__torch_function__` does more than torch's default.
_CUSTOM: dict[type, bool] = {}
#: Marks the copies `pin_memory` made while simulating: they answer `is_pinned()` with True.
_PINNED = "_devicekit_pinned"


def _defers(kinds: Sequence[type]) -> bool:
    """Whether one of `kinds` has a `__torch_function__` of its own (not torch's default, nor
    the one that only turns subclass handling off)."""
    for kind in kinds:
        custom = _CUSTOM.get(kind)
        if custom is None:
            method = getattr(kind, "__torch_function__", None)
            method = getattr(method, "__func__", method)
            custom = method not in (_DEFAULT_TORCH_FUNCTION, _DISABLED_TORCH_FUNCTION)
            _CUSTOM[kind] = custom
        if custom:
            return True
    return False


#: `_defers` per tuple of operand types, as the mode receives it (a handful in any program).
_DEFERS: dict[tuple[type, ...], bool] = {}


def _defers_cached(kinds: tuple[type, ...]) -> bool:
    found = _DEFERS.get(kinds)
    if found is None:
        if len(_DEFERS) > 1000:
            _DEFERS.clear()
        found = _DEFERS[kinds] = _defers(kinds)
    return found


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
        memory = _simulate_facts.active
        if memory is not None:
            memory.add(tensor, device)  # memory accounting; may raise OutOfMemoryError
        tensor.__dict__[_TAG] = device
    kind = type(tensor)
    if kind is not torch.Tensor and (_WRAPS[kind] if kind in _WRAPS else _wraps(kind)):
        _tag_inner(tensor, device)


#: Whether each tensor type is a wrapper subclass that names its inner tensors
#: (`__tensor_flatten__`: torch_geometric's `EdgeIndex`, nested tensors).
_WRAPS: dict[type, bool] = {}


def _wraps(kind: type) -> bool:
    found = _WRAPS[kind] = callable(getattr(kind, "__tensor_flatten__", None))
    return found


def _tag_inner(wrapper: torch.Tensor, device: torch.device | None) -> None:
    """Tag the tensors a wrapper subclass holds (its data, cached indices and values) as the
    wrapper: on a GPU they live where it does."""
    for inner in list(wrapper.__dict__.values()):
        if (
            isinstance(inner, torch.Tensor)
            and inner is not wrapper
            and inner.__dict__.get(_TAG) != device
        ):
            _set_tag(inner, device)


def _device_of(tensor: torch.Tensor) -> torch.device:
    """Where `tensor` is, as the user sees it (with the mode off)."""
    simulated = _simulated(tensor)
    return tensor.device if simulated is None else simulated


def _operands(args: Sequence[object], kwargs: dict[str, object]) -> list[tuple[str, torch.Tensor]]:
    """Each tensor argument with a label, looking one level into lists and tuples."""
    found: list[tuple[str, torch.Tensor]] = []
    for position, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            found.append((_ARG_LABELS[position] if position < 8 else f"args[{position}]", value))
        elif isinstance(value, (list, tuple)):
            _visit_sequence(found, f"args[{position}]", value)
    if kwargs:
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                found.append((name, value))
            elif isinstance(value, (list, tuple)):
                _visit_sequence(found, name, value)
    return found


_ARG_LABELS = tuple(f"args[{position}]" for position in range(8))


def _visit_sequence(
    found: list[tuple[str, torch.Tensor]], label: str, value: Sequence[object]
) -> None:
    for index, item in enumerate(value):
        if isinstance(item, torch.Tensor):
            found.append((f"{label}[{index}]", item))


def _counts(tensor: torch.Tensor) -> bool:
    """Whether a tensor takes part in the device check (0-dim CPU tensors mix freely, and a
    lazy module's uninitialized parameters have no data to mix)."""
    if _simulated(tensor) is not None or tensor.device.type != "cpu":
        return True
    return not isinstance(tensor, _Uninitialized) and tensor.dim() > 0


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
    devices = list(dict.fromkeys(_device_of(tensor) for _, tensor in operands))
    accelerators = [device for device in devices if device.type != "cpu"]
    session, note = _active, None
    if session is not None:
        simulated = (
            f"Device {session.type}:0 is"
            if session.count == 1
            else f"Devices {session.type}:0 to {session.type}:{session.count - 1} are"
        )
        note = (
            f"({simulated} simulated on the CPU by devicekit.simulated_devices; real hardware "
            "raises here too.)"
        )
    target = accelerators[0] if len(accelerators) == 1 else None
    report = Report(
        op,
        operands,
        devices=devices,
        target=target,
        block="simulated_devices",
        device_of=_device_of,
    )
    return report.error(note=note)


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
    session = _active
    for label, tensor in operands:
        device: torch.device | None = tensor.__dict__.get(_TAG)  # `_simulated`, inlined
        if device is not None and (
            session is None or device.type != session.type or (device.index or 0) >= session.count
        ):
            device = None
        if device is None:
            device = tensor.device
            if (  # `not _counts(tensor)`, inlined
                device.type == "cpu" and (tensor.dim() == 0 or isinstance(tensor, _Uninitialized))
            ) or exempt(label):
                continue
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


# --- the mode and its handlers --------------------------------------------------------------------
#
# The mode sorts each call to one handler: an attribute read or write (`.device`, `.grad = g`),
# one of the tensor methods the simulation answers itself (`_METHODS`), a move (`.to`, `.cuda`),
# a call with `device=` (factories), a `torch._foreach_*` op, or any other op (checked, and its
# results tagged).


class _SimulationMode(TorchFunctionMode):
    """Reports simulated devices and checks every op while `session` is the active simulation.

    Once its session has ended it lets every call through untouched (it may still sit on the
    stack of a thread that has not run devicekit code since another thread ended it).
    """

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
        session = self.session
        if session is not _active:
            return func(*args, **(kwargs or {}))
        if type(func) is _METHOD_WRAPPER and len(args) == 1:
            tensor = args[0]  # reading an attribute (`.shape`, `.device`) of a plain tensor
            if type(tensor) is _Tensor and _TAG not in tensor.__dict__:
                return func(tensor)
        if types_ and (_DEFERS.get(types_) or _defers_cached(types_)) and _subclasses_enabled():
            # An operand's type overrides `__torch_function__` (a tensor subclass, TensorDict):
            # let it run first, with this mode still on the stack, so that the torch calls it
            # makes (its `super()` call included) are simulated and checked here in turn.
            return NotImplemented
        plain = _PLAIN.get(func)
        if plain is None:
            plain = _plain(func)
        if (
            plain
            and _untouched(args, plain != _NO_INDEX)
            and (not kwargs or _untouched_keywords(kwargs))
            and (plain != _FACTORY or _torch_device.CURRENT_DEVICE is None)
        ):
            # The common case of a CPU test under a run-wide simulation: no simulated operand,
            # no simulated device named. Only the caller's line is kept (see `_runner`).
            if plain == _ATTRIBUTE:
                return func(*args)
            caller = _getframe(1)
            found = _runners.get((id(caller.f_code), caller.f_lasti))
            if found is None:
                found = _runner(caller)
            if plain == _FACTORY:  # where it ran, for a cross-device error's provenance
                return _provenance.made(func, found[2](func, args, kwargs or {}))
            return found[2](func, args, kwargs) if kwargs else found[3](func, args)
        name = _DIRECT.get(func)
        if name is not None and (not kwargs or _HANDLED_KEYWORDS.isdisjoint(kwargs)):
            # An op with no handler of its own (most ops on simulated tensors): checked as is.
            method = bool(args) and isinstance(args[0], _Tensor)
            return _op(func, name, method, args, kwargs or {})
        kwargs = kwargs or {}
        if kwargs.get("pin_memory"):  # nothing to pin on a CPU build: copy the same
            made = self.__torch_function__(func, types_, args, {**kwargs, "pin_memory": False})
            if isinstance(made, torch.Tensor) and _simulated(made) is None:
                made.__dict__[_PINNED] = True
            return made
        if type(func) is _METHOD_WRAPPER:
            return _attribute(session, func, args)
        if func is _Device and len(args) == 1 and type(args[0]) is int and not kwargs:
            return _Device(session.type, args[0])  # `torch.device(0)`: the accelerator's type
        name = getattr(func, "__name__", "")
        if name in _QUERIES:
            if name == "_parse_to":  # `Module.to(0)`: an index names the simulated type
                args, kwargs = _indices_named(session, args, kwargs)
            return func(*args, **kwargs)
        if kwargs.get("generator") is not None:  # a cuda generator for a CPU op raises
            _simulate_rng.refuse_on_cpu(func, kwargs["generator"], args, kwargs, session.resolve)
        method = bool(args) and isinstance(args[0], torch.Tensor)
        if method:
            handler = _METHODS.get(name) or (_move_to_current if name == session.type else None)
            if handler is not None:
                special = handler(self, func, args, kwargs)
                if special is not NotImplemented:
                    return special
        if kwargs.get("device") is None and func in _device_constructors():
            default = _torch_default_device()
            if default is not None and session.resolve(default) is not None:
                kwargs = {**kwargs, "device": default}
        if "device" in kwargs:
            if kwargs["device"] is not None:
                return _factory(session, func, args, kwargs)
            kwargs = {key: value for key, value in kwargs.items() if key != "device"}
        if name.startswith("_foreach_"):
            return _foreach(func, args, kwargs)
        return _op(func, name, method, args, kwargs)


# --- the fast path: ops the simulation has nothing to do with -------------------------------------
#
# Under a run-wide simulation most ops of a CPU test touch no simulated tensor and name no device.
# Such a call is run as it is, after a scan of its arguments that allocates nothing.

#: `_PLAIN` values: plain with any arguments; with any but a bare int (`.to(0)` names a device);
#: a factory, plain while no `torch.set_default_device` or `with torch.device(...)` is in force;
#: an attribute's `__get__` or `__set__` (which warns of nothing: called directly).
_ANY, _NO_INDEX, _FACTORY, _ATTRIBUTE = 1, 2, 3, 4
#: Per torch function: 0 when a call is always the handlers' business, else one of the above
#: (the call is then plain when its arguments are: `_untouched`).
_PLAIN: dict[object, int] = {}
#: Functions whose calls the handlers always see: pinning, `Module.to`'s parser, `.cuda()` and
#: its kin, `.type(torch.cuda.FloatTensor)`.
_HANDLED = frozenset({"pin_memory", "is_pinned", "_parse_to", "cuda", "xpu", "mps", "type"})
#: Functions whose bare int argument names a device: `.to(0)`, `torch.device(0)`.
_INDEXED = frozenset({"to", "device"})
_torch_device = sys.modules["torch.utils._device"]
_Tensor = torch.Tensor
_Device = torch.device


def _plain(func: object) -> int:
    if type(func) is _METHOD_WRAPPER:
        found = _ATTRIBUTE  # `_attribute` does nothing for untagged tensors
    else:
        name = getattr(func, "__name__", "")
        if name in _HANDLED:
            found = 0
        elif name in _INDEXED:
            found = _NO_INDEX
        else:
            try:
                factory = func in _device_constructors() or func in _provenance.FACTORIES
                found = _FACTORY if factory else _ANY  # `*_like` too: recorded, as factories
            except TypeError:  # unhashable: always handled
                return 0
    if len(_PLAIN) > _MAX_RUNNERS:
        _PLAIN.clear()
        _DIRECT.clear()
    _PLAIN[func] = found
    if found == _ANY:
        name = getattr(func, "__name__", "")
        if name not in _METHODS and name not in _QUERIES and not name.startswith("_foreach_"):
            _DIRECT[func] = name
    return found


#: Per torch function with no handler of its own (no method the simulation answers, no query,
#: no factory, no `_foreach_*`): its name. Such a call goes straight to `_op` unless a keyword
#: argument needs a handler (`_HANDLED_KEYWORDS`).
_DIRECT: dict[object, str] = {}
_HANDLED_KEYWORDS = frozenset({"device", "pin_memory", "generator"})


def _untouched(values: Sequence[object], indices: bool) -> bool:
    """Whether `values` hold no simulated tensor and name no device but the CPU (looking one
    level into lists and tuples, as `_operands` does); a bare int names a device unless
    `indices`. Allocates nothing."""
    for value in values:
        kind = type(value)
        if kind is _Tensor or isinstance(value, _Tensor):
            if _TAG in value.__dict__:
                return False
        elif kind is int:
            if not indices:
                return False
        elif kind is list or kind is tuple:
            for item in value:  # type: ignore[attr-defined]
                if isinstance(item, _Tensor):
                    if _TAG in item.__dict__:
                        return False
                elif isinstance(item, _SPECS) and not _names_cpu(item):
                    return False
        elif (kind is _Device or kind is str) and not _names_cpu(value):
            return False
    return True


_SPECS = (str, torch.device)


def _names_cpu(spec: object) -> bool:
    return spec == "cpu" if type(spec) is str else spec.type == "cpu"  # type: ignore[attr-defined]


def _untouched_keywords(kwargs: dict[str, Any]) -> bool:
    """`_untouched` for keyword arguments: `device=` may name the CPU or nothing, `pin_memory`
    must be off and `generator` absent (a simulated device's generator refuses CPU ops)."""
    if "device" in kwargs:
        device = kwargs["device"]
        if device is not None and not (isinstance(device, _SPECS) and _names_cpu(device)):
            return False
    if kwargs.get("pin_memory") or kwargs.get("generator") is not None:
        return False
    return _untouched(tuple(kwargs.values()), True)


def _op(
    func: Callable[..., Any], name: str, method: bool, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """Any other op: check its operands' devices, run it, tag the results."""
    __tracebackhide__ = True
    operands = _operands(args, kwargs)
    if method and name in _TRANSFERS:
        operands = operands[:1]
    elif name == "__setitem__" and len(args) > 2 and _copies_value(args[1], args[2]):
        operands = [(label, tensor) for label, tensor in operands if label != "args[2]"]
    if not operands:  # a factory, recorded for a cross-device error's provenance
        return _provenance.made(func, func(*args, **kwargs))
    exempt = _exemption(name) if method else _never
    device = _check(func, operands, exempt, (args, kwargs))
    if device is not None and torch._C._is_any_autocast_enabled():
        from devicekit._simulate_autocast import wrap  # CUDA's autocast policy, op by op

        func = wrap(func, name, device)
    if device is not None and name in _simulate_rng.RANDOM_OPS:
        func = _simulate_rng.seeded(func, device)  # random ops draw from the device's generator
    caller = _getframe(2)  # the frame that called the torch op (`_op` <- the mode <- it)
    found = _runners.get((id(caller.f_code), caller.f_lasti))
    run = (found if found is not None else _runner(caller))[2]
    result = run(func, args, kwargs)
    if device is None:
        return result
    for _, tensor in operands:
        kind = type(tensor)
        if kind is not torch.Tensor and (_WRAPS[kind] if kind in _WRAPS else _wraps(kind)):
            # A wrapper subclass may have filled caches below the mode (`EdgeIndex._indptr`,
            # made in its `__torch_dispatch__`): on a GPU they live where it does.
            _tag_inner(tensor, _simulated(tensor))
    if type(result) is torch.Tensor:
        for _, tensor in operands:
            if tensor is result:  # an in-place op hands back its input
                return result
        _set_tag(result, device)
        return result
    if not isinstance(result, (torch.Tensor, list, tuple)):
        return result  # a bool, a number, None: nothing to tag
    return _tag_results(result, device, {id(tensor) for _, tensor in operands})


_getframe = sys._getframe
_OVERRIDES = torch.overrides.__file__
#: Per calling instruction, keyed by the id of its code (hashing a big function's code object
#: costs more than the rest of a lookup) and the instruction's offset (a frame computes its line
#: number from the offset on every read, 0.1 us): that code, kept alive so that its id stays its
#: own, its line, and two functions that call a torch op "from" that line, with and without
#: keyword arguments (see `_runner`).
_Runner = tuple[types.CodeType, int, Callable[..., Any], Callable[..., Any]]
_runners: dict[tuple[int, int], _Runner] = {}
#: The same per calling line, made once per line.
_line_runners: dict[tuple[int, int], _Runner] = {}


def _runner(caller: types.FrameType) -> _Runner:
    """Functions that call `func(*args, **kwargs)` from `caller`'s module, file and line.

    A warning torch issues from C++ names the innermost Python frame, which would otherwise be
    this module's: so `filterwarnings` rules by module or file, and the reported location,
    see the user's line that called the op, as they do without the simulation.
    """
    line = (id(caller.f_code), caller.f_lineno)
    found = _line_runners.get(line)
    if found is None:
        frame: types.FrameType | None = caller
        while frame is not None and frame.f_code.co_filename == _OVERRIDES:
            frame = frame.f_back  # a Python-level torch function's `handle_torch_function`
            frame = frame.f_back if frame is not None else None  # ... and that function
        source = frame if frame is not None else caller
        lines = "\n" * (source.f_lineno - 1)
        source_text = f"{lines}run = lambda f, a, k: f(*a, **k); positional = lambda f, a: f(*a)"
        namespace: dict[str, Any] = {}
        code = compile(source_text, source.f_code.co_filename, "exec")
        exec(code, source.f_globals, namespace)
        if len(_line_runners) > _MAX_RUNNERS:
            _line_runners.clear()
        found = (caller.f_code, line[1], namespace["run"], namespace["positional"])
        _line_runners[line] = found
    if len(_runners) > _MAX_RUNNERS:
        _runners.clear()
    _runners[(id(caller.f_code), caller.f_lasti)] = found
    return found


_MAX_RUNNERS = 10_000


def _copies_value(key: object, value: object) -> bool:
    """Whether `tensor[key] = value` copies `value` from wherever it lives, as CUDA does: a
    0-dim tensor always, any tensor where `key` holds no index tensors (a view, then `copy_`)."""
    if not isinstance(value, torch.Tensor):
        return False
    if value.dim() == 0:
        return True
    parts = key if isinstance(key, tuple) else (key,)
    return not any(isinstance(part, (torch.Tensor, list)) for part in parts)


def _indices_named(
    session: _Session, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[Sequence[Any], dict[str, Any]]:
    """`Module.to(0)`'s arguments with a bare device index spelled as a simulated device (torch
    would ask the accelerator there is none of for its type)."""

    def named(value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            return session.resolve(value)
        return value

    if args:
        args = (named(args[0]), *args[1:])
    if "device" in kwargs:
        kwargs = {**kwargs, "device": named(kwargs["device"])}
    return args, kwargs


def _attribute(session: _Session, func: Any, args: Sequence[Any]) -> Any:
    """Reading or setting a tensor attribute: `.device`, `.is_cuda`, `.grad = g`, `.data = d`."""
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
    if name == (_IS_TYPE.get(session.type) or _is_type(session.type)):
        return simulated is not None
    if name == "is_cpu":
        return simulated is None and func(*args)
    result = func(*args)
    if (
        simulated is not None
        and isinstance(result, torch.Tensor)
        and result.__dict__.get(_TAG) != simulated  # `.grad` is read again and again
    ):
        _set_tag(result, simulated)
    return result


#: `"is_cuda"` for `"cuda"`: the attribute that says a tensor is on the simulated type.
_IS_TYPE: dict[str, str] = {}


def _is_type(device_type: str) -> str:
    found = _IS_TYPE[device_type] = f"is_{device_type}"
    return found


# --- the tensor methods the simulation answers itself ---------------------------------------------
# Each takes (mode, func, args, kwargs) and returns the answer, or `NotImplemented` to treat the
# call as an ordinary op.

_Method = Callable[[_SimulationMode, Callable[..., Any], Sequence[Any], dict[str, Any]], Any]


def _to_method(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    return _move(mode.session, func, args[0], args[1:], kwargs)


def _move_to_current(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """`tensor.cuda()` (or `.xpu()`, `.mps()`) for the simulated type."""
    session = mode.session
    spec = kwargs.pop("device", args[1] if len(args) > 1 else None)
    target = session.device(session.current) if spec is None else spec
    return _move(session, torch.Tensor.to, args[0], (target,), kwargs)


def _cpu(mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if _simulated(args[0]) is None:
        return func(*args, **kwargs)
    return _unshared(args[0], torch.Tensor.to(args[0], _CPU, copy=True, **kwargs))


def _unshared(source: torch.Tensor, moved: Any) -> Any:
    """`moved`, a copy of `source` off its simulated device, without the inner tensors it shares
    with `source`: a wrapper subclass's move may hand them over as they are (a jagged nested
    tensor's offsets are already CPU tensors), tagged with the source's device. On a GPU the
    move copies them, so `moved` gets untagged copies (a nested tensor's copy keeps the nested
    size its offsets stand for)."""
    kind = type(moved)
    if kind is torch.Tensor or not (_WRAPS[kind] if kind in _WRAPS else _wraps(kind)):
        return moved
    nested = sys.modules.get("torch.nested._internal.nested_tensor")
    registry = getattr(nested, "_tensor_symint_registry", None)
    for name, inner in list(moved.__dict__.items()):
        shared = isinstance(inner, torch.Tensor) and inner is source.__dict__.get(name)
        if shared and _TAG in inner.__dict__:
            copy = torch.Tensor.clone(inner)
            if registry is not None and inner in registry:
                registry[copy] = registry[inner]
            moved.__dict__[name] = copy
    return moved


def _get_device(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    simulated = _simulated(args[0])
    return func(*args, **kwargs) if simulated is None else simulated.index


def _numpy(mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    simulated = _simulated(args[0])
    if simulated is None:
        return NotImplemented
    raise TypeError(
        f"can't convert {simulated} device type tensor to numpy. "
        "Use Tensor.cpu() to copy the tensor to host memory first."
    )


def _pin_memory(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    return pinned_copy(args[0])


def pinned_copy(tensor: torch.Tensor, device: object = None) -> torch.Tensor:
    """`Tensor.pin_memory` while simulating: a copy that answers `is_pinned()` with True (a
    CPU build has no pinned memory), refused for a simulated tensor as CUDA refuses it.

    Patched onto `torch.Tensor` for the simulation, so that it also runs in threads without
    the mode (a DataLoader's pin-memory thread).
    """
    simulated = _simulated(tensor)
    if simulated is not None:
        raise RuntimeError(
            f"cannot pin '{torch.Tensor.type(tensor)}' only dense CPU tensors can be pinned "
            f"(the tensor is on the simulated {simulated})"
        )
    if tensor.__dict__.get(_PINNED):
        return tensor
    copy = torch.Tensor.clone(tensor)
    copy.__dict__[_PINNED] = True
    return copy


def _is_pinned(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    return bool(args[0].__dict__.get(_PINNED))


def _is_shared(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """CUDA memory counts as shared (torch.multiprocessing sends it by handle)."""
    return True if _simulated(args[0]) is not None else NotImplemented


def _share_memory(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    return args[0] if _simulated(args[0]) is not None else NotImplemented


def _reduce_ex(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """Pickling a wrapper subclass (`EdgeIndex`) on a simulated device: torch records the
    wrapper's device as it reads it below the mode (`cpu`); record the simulated one, as a
    checkpoint written on a GPU does (loading it restores the wrapper there)."""
    simulated = _simulated(args[0])
    reduced = func(*args, **kwargs)
    if simulated is None or not isinstance(reduced, tuple) or len(reduced) != 2:
        return reduced
    rebuild, rebuild_args = reduced
    if rebuild is not torch._tensor._rebuild_from_type_v2 or len(rebuild_args) != 4:
        return reduced
    inner, kind, inner_args, state = rebuild_args
    if inner is torch._utils._rebuild_wrapper_subclass and len(inner_args) == _PICKLED_DEVICE + 2:
        inner_args = (*inner_args[:_PICKLED_DEVICE], simulated, inner_args[-1])
        return rebuild, (inner, kind, inner_args, state)
    return reduced


#: Where the device sits in `_rebuild_wrapper_subclass`'s arguments (before `requires_grad`).
_PICKLED_DEVICE = 6


def _type(mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if len(args) != 1 or kwargs or _simulated(args[0]) is None:
        return NotImplemented
    spelled = str(func(*args))  # "torch.FloatTensor" names "torch.cuda.FloatTensor" there
    return spelled.replace("torch.", f"torch.{mode.session.type}.", 1)


def _record_stream(
    mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    return None if _simulated(args[0]) is not None else NotImplemented


def _repr(mode: _SimulationMode, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if _simulated(args[0]) is None:
        return NotImplemented
    with mode:  # torch's printer reads `.device`: let it see the simulated one
        text: str = torch._tensor_str._str(args[0], **kwargs)  # type: ignore[no-untyped-call]
    return text


_METHODS: dict[str, _Method] = {
    "to": _to_method,
    "cpu": _cpu,
    "get_device": _get_device,
    "numpy": _numpy,
    "pin_memory": _pin_memory,
    "is_pinned": _is_pinned,
    "is_shared": _is_shared,
    "share_memory_": _share_memory,
    "__array__": _numpy,
    "type": _type,
    "record_stream": _record_stream,
    "__reduce_ex__": _reduce_ex,
    "__repr__": _repr,
}


# --- moves, factories and foreach ops -------------------------------------------------------------


def _move(
    session: _Session,
    func: Callable[..., Any],
    tensor: torch.Tensor,
    rest: Sequence[Any],
    kwargs: dict[str, Any],
) -> Any:
    """`tensor.to(...)` and its spellings: a copy on the CPU tagged with the simulated target."""
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
    target = session.resolve(spec)
    if target is None:
        real = torch.device(spec)
        if current is None:
            return func(tensor, real, *rest, **kwargs)
        kwargs["copy"] = True
        return _unshared(tensor, func(tensor, real, *rest, **kwargs))
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
    session: _Session, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """A call with `device=`: made on the CPU, tagged with the simulated device it names."""
    spec = kwargs["device"]
    if isinstance(spec, torch.Tensor):
        return func(*args, **kwargs)
    target = session.resolve(spec)
    inputs = {id(tensor) for _, tensor in _operands(args, kwargs)}
    if target is None:
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and _simulated(result) is not None:
            return torch.Tensor.to(result, _CPU, copy=True)
        return result
    kwargs = {**kwargs, "device": _CPU}
    _simulate_facts.admit(func, args, kwargs, target)  # CUDA's OutOfMemoryError, before the CPU
    caller = _getframe(2)  # the frame that called the factory (`_factory` <- the mode <- it)
    found = _runners.get((id(caller.f_code), caller.f_lasti))
    run = (found if found is not None else _runner(caller))[2]
    result = run(_simulate_rng.seeded(func, target), args, kwargs)
    if isinstance(result, torch.Tensor):
        result = _fresh(result, inputs)
    return _provenance.made(func, _tag_results(result, target, set()), target)


_FOREACH_COPY = torch._foreach_copy_


def _foreach(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """`torch._foreach_*`: operands at the same list position must share a device, except for
    `_foreach_copy_`, a copy at each position (`copy_` between devices, as CUDA allows): the
    destinations keep their devices."""
    __tracebackhide__ = True
    if func is _FOREACH_COPY:
        return func(*args, **kwargs)
    lists = [value for value in args if isinstance(value, (list, tuple))]
    lists = [value for value in lists if value and isinstance(value[0], torch.Tensor)]
    loose = [
        (label, tensor)
        for label, tensor in _operands(
            [a for a in args if not isinstance(a, (list, tuple))], kwargs
        )
    ]
    length = min((len(value) for value in lists), default=0)
    devices = None if loose else _same_devices(lists, length)
    if devices is None:
        devices = []
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


def _same_devices(lists: list[Any], length: int) -> list[torch.device | None] | None:
    """The simulated device at each position of a `_foreach_*` op's lists when every tensor in
    them is on one and the same, else `None` (`_check` then looks, position by position). An
    optimizer's step over many parameters on one device takes this way, a dict read per tensor."""
    session = _active
    device: torch.device | None = None
    for value in lists:
        for position in range(length):
            item = value[position]
            if not isinstance(item, torch.Tensor):
                return None
            tag = item.__dict__.get(_TAG)
            if tag is None:
                return None
            if device is None:
                device = tag
            elif tag is not device and tag != device:
                return None  # several devices: `_check` says whether each position agrees
    if (
        device is None
        or session is None
        or device.type != session.type
        or (device.index or 0) >= session.count
    ):
        return None
    return [device] * length


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
    if name == "_nested_view_from_jagged":
        return _NESTED_AUXILIARY.__contains__
    return _never


# --- torch entry points below the mode ------------------------------------------------------------
# Calls that make a new tensor object without passing torch's function modes: the simulation
# replaces them while it is active (`_simulate_patches` installs these with the rest).


def tensor_patches(session: _Session) -> dict[tuple[object, str], object]:
    """The replacements that carry tags across calls the mode does not see."""
    as_subclass = torch._C.TensorBase.as_subclass
    make_wrapper = torch._C.TensorBase._make_wrapper_subclass
    from torch._functorch import vmap  # imported by torch itself already

    batch: Callable[..., Any] = vmap._create_batched_inputs
    unbatch: Callable[..., Any] = vmap._unwrap_batched

    def as_subclass_keeping_tag(tensor: torch.Tensor, cls: type) -> torch.Tensor:
        made: torch.Tensor = as_subclass(tensor, cls)
        _set_tag(made, _simulated(tensor))
        return made

    def make_wrapper_subclass(cls: type, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`_make_wrapper_subclass(cls, ..., device="cuda:1")`: a CPU wrapper tagged `cuda:1`."""
        positional = len(args) > _WRAPPER_DEVICE
        spec = args[_WRAPPER_DEVICE] if positional else kwargs.get("device")
        target = session.resolve(spec) if _active is session else None
        if target is None:
            return make_wrapper(cls, *args, **kwargs)
        if positional:
            args = (*args[:_WRAPPER_DEVICE], _CPU, *args[_WRAPPER_DEVICE + 1 :])
        else:
            kwargs = {**kwargs, "device": _CPU}
        made: torch.Tensor = make_wrapper(cls, *args, **kwargs)
        made.__dict__[_TAG] = target  # not `_set_tag`: it owns no memory, and is not built yet
        return made

    # vmap's entry and exit, which TensorDict replaces with its own on import: whichever is
    # there, the batched inputs take their inputs' devices, and the outputs their batched ones'.
    def batched(in_dims: Any, flat_args: list[Any], *args: Any) -> Any:
        made = batch(in_dims, flat_args, *args)
        return _tags_copied(flat_args, made)

    def unbatched(outputs: Any, *args: Any) -> Any:
        return _tags_copied(outputs, unbatch(outputs, *args))

    functions = torch._C._functions  # autograd nodes called as functions (gradcheck does)
    return {
        (torch._C.ScriptFunction, "__call__"): _scripted(torch._C.ScriptFunction.__call__),
        (torch.jit.ScriptModule, "__call__"): _scripted(torch.jit.ScriptModule.__call__),
        (functions, "UndefinedGrad"): _tagging(functions.UndefinedGrad),
        (functions, "DelayedError"): _tagging(functions.DelayedError),
        (torch.Tensor, "as_subclass"): as_subclass_keeping_tag,
        (torch.Tensor, "_make_wrapper_subclass"): staticmethod(make_wrapper_subclass),
        (torch.Tensor, "pin_memory"): pinned_copy,
        (vmap, "_create_batched_inputs"): batched,
        (vmap, "_unwrap_batched"): unbatched,
    }


def _tags_copied(sources: Any, made: Any) -> Any:
    """`made` (a pytree), each tensor tagged as the tensor at its place in `sources` is."""
    found = torch.utils._pytree.tree_leaves(sources)
    results = torch.utils._pytree.tree_leaves(made)
    if len(found) == len(results):
        for source, result in zip(found, results, strict=True):
            if isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor):
                device = _simulated(source)
                if device is not None:
                    _set_tag(result, device)
    return made


def _scripted(call: Callable[..., Any]) -> Callable[..., Any]:
    """A TorchScript function's or module's `__call__`: TorchScript runs below the mode, so its
    tensor arguments are checked here, and its results tagged with their device."""

    def run(scripted: Any, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        if _active is None:
            return call(scripted, *args, **kwargs)
        name = getattr(scripted, "name", None) or type(scripted).__name__
        device = _check(f"TorchScript {name}", _operands(args, kwargs), _never)
        result = call(scripted, *args, **kwargs)
        return result if device is None else _tag_results(result, device, set())

    return run


def _tagging(node: Callable[..., Any]) -> Callable[..., Any]:
    """`node` (a C++ autograd function such as `UndefinedGrad`), whose calls tag their outputs
    with their inputs' simulated device."""

    def make(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        function = node(*args, **kwargs)

        def call(*inputs: Any) -> Any:
            outputs = function(*inputs)
            devices = (_simulated(item) for item in inputs if isinstance(item, torch.Tensor))
            device = next((found for found in devices if found is not None), None)
            if device is None:
                return outputs
            keep = {id(item) for item in inputs}
            return _tag_results(outputs, device, keep)

        return call

    return make


#: Where `device` sits among `_make_wrapper_subclass`'s positional arguments after `cls`.
_WRAPPER_DEVICE = 6
