"""Building modules without memory: `deferred()` records their construction for replay.

Inside a `deferred()` block, tensors that would be allocated on the default device are created
on `meta` instead, and a torch function mode writes down every torch call that makes or changes
a meta tensor: factory calls, the arithmetic that computes buffers (`1 / base ** (arange / d)`),
`nn.init.*` calls, in-place ops such as `normal_`, `copy_` and `fill_`, and the clones that
`copy.deepcopy` makes. Each call is one `Op`: the function, its arguments (meta tensors kept as
they are) and which storages it reads and writes, keyed by the storage of each meta tensor, so a
`Parameter`, its `.data` and its views all name the same storage. `devicekit.materialize` replays
the ops on the real device (`devicekit._materialize`).

While recording, code under construction sees the device it is built for: `Tensor.device`,
`is_meta`, `is_cpu` and `is_cuda` of a meta tensor, and `torch.get_default_device()`, answer
the block's device. Libraries that skip initialisation on meta (transformers' `init_weights`)
therefore initialise as they would in eager construction, and the initialisation is recorded.
A device argument naming that device is recorded as the target, so
`torch.zeros(3, device=self.weight.device)` lands on the target too.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function_unary
from torch.utils._device import DeviceContext, _device_constructors
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from devicekit._describe import describe_tensor, op_name, user_call_site
from devicekit._errors import MaterializeError
from devicekit._modes import users
from devicekit._resolve import resolve
from devicekit._scope import Kind, Record, Scoped
from devicekit._simulate_rng import RANDOM_OPS
from devicekit._types import DeviceLike

__all__ = [
    "Op",
    "Recording",
    "Ref",
    "deferred",
    "disown",
    "recording_of",
    "replaced",
    "storage_key",
]

_META = torch.device("meta")


def storage_key(tensor: torch.Tensor) -> int:
    """The identity of `tensor`'s storage, shared by its views, `.data` and `Parameter`s."""
    return int(tensor.untyped_storage()._cdata)


class Ref:
    """A meta tensor as it was when an op saw it: its storage (kept alive, so that its key stays
    unique) and its geometry. Recorded instead of the tensor, whose storage may be swapped later
    (`param.data = other`)."""

    __slots__ = ("dtype", "key", "offset", "shape", "storage", "stride")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.storage = tensor.untyped_storage()
        self.key = int(self.storage._cdata)
        self.dtype = tensor.dtype
        self.shape = tuple(tensor.shape)
        self.stride = tuple(tensor.stride())
        self.offset = tensor.storage_offset()


def _refs(value: Any) -> Any:
    return Ref(value) if _is_meta(value) else value


class Op:
    """One recorded torch call: `func(*args, **kwargs)`, and the storages it touched.

    Meta tensors in `args`, `kwargs` and `outputs` (the flattened leaves of the result) are
    recorded as `Ref`s; `reads` are the storage keys of the meta tensors among the arguments,
    `writes` those of the outputs and of the arguments it changed in place; `random` says
    whether it draws from a generator; `default_dtype` is torch's default dtype at the call.
    """

    __slots__ = ("args", "default_dtype", "func", "kwargs", "outputs", "random", "reads", "writes")

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outputs: list[Any],
        reads: frozenset[int],
        writes: frozenset[int],
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.outputs = outputs
        self.reads = reads
        self.writes = writes
        self.random = _is_random(func)
        # `torch.zeros(3)` and `arange(4) / 2` take their dtype from the default dtype, which
        # code may set while building (transformers' `from_config(dtype=...)` does).
        self.default_dtype = torch.get_default_dtype()

    @property
    def name(self) -> str:
        return op_name(self.func)


def _is_random(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    return name in RANDOM_OPS or name in _INIT_RANDOM


#: `nn.init` functions that draw (beyond the aten names in `RANDOM_OPS`).
_INIT_RANDOM = frozenset(
    {
        "kaiming_normal_",
        "kaiming_uniform_",
        "normal_",
        "orthogonal_",
        "sparse_",
        "trunc_normal_",
        "uniform_",
        "xavier_normal_",
        "xavier_uniform_",
    }
)


_SERIAL = itertools.count()


class Recording:
    """The ops one `deferred()` block recorded, and what replaying them needs.

    `produced` are the storages an op created; `versions` the version counter of every
    recorded meta tensor when the block ended, to notice in-place changes made afterwards;
    `start_states` the target generators' states before the first replay on each device, so
    that a second replay (of another part of the same block) draws the same numbers;
    `slots` what each module the block registered held when it ended (its type, and a `Ref`
    per meta parameter and buffer, by name), to tell what happened to a tensor replaced later.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.serial = next(_SERIAL)
        self.ops: list[Op] = []
        self.produced: dict[int, int] = {}  # storage key -> index of the op that created it
        self.versions: list[tuple[torch.Tensor, int]] = []
        self.created: list[torch.Tensor] = []
        self.start_states: dict[torch.device, torch.Tensor] = {}
        self.thread = threading.get_ident()
        self.modes: tuple[TorchFunctionMode, ...] = ()
        self.hooks: list[Any] = []
        self.dispatching = False
        self.owned: list[weakref.ref[torch.nn.Module]] = []
        self.slots: dict[int, tuple[type, dict[str, Ref]]] = {}
        self.__weakref__: Any

    def __repr__(self) -> str:
        return f"<devicekit recording of {len(self.ops)} ops for {self.device}>"

    # --- recording -------------------------------------------------------------------------------

    def add(self, op: Op, created: list[torch.Tensor]) -> None:
        index = len(self.ops)
        self.ops.append(op)
        self.created.extend(created)
        for tensor in created:
            key = storage_key(tensor)
            if key not in self.produced:
                self.produced[key] = index
                _BY_STORAGE[key] = self

    def own(self, module: object, *_: object) -> None:
        """Keep this recording alive as long as `module`, registered inside the block, lives."""
        if threading.get_ident() != self.thread or id(module) in _OWNERS:
            return
        _OWNERS[id(module)] = self
        weakref.finalize(module, _OWNERS.pop, id(module), None)
        if isinstance(module, torch.nn.Module):
            self.owned.append(weakref.ref(module))

    def start(self) -> None:
        """Begin recording on this thread; `stop` undoes whatever of it was done."""
        from torch.nn.modules import module as torch_module

        for register in (
            torch_module.register_module_parameter_registration_hook,
            torch_module.register_module_buffer_registration_hook,
            torch_module.register_module_module_registration_hook,
        ):
            self.hooks.append(register(self.own))
        self.dispatching = True
        _dispatch_init(+1)
        holder = users()
        self.modes = (_DefaultDevice(self.device), _RecordingMode(self))
        for mode in self.modes:
            holder.acquire_instance(mode)

    def stop(self) -> None:
        holder = users()
        for mode in reversed(self.modes):
            holder.release_instance(mode)
        if self.dispatching:
            self.dispatching = False
            _dispatch_init(-1)
        while self.hooks:
            self.hooks.pop().remove()
        unique = {id(tensor): tensor for tensor in self.created}.values()
        self.versions = [(tensor, _version(tensor)) for tensor in unique]
        self.created = []
        for reference in self.owned:
            module = reference()
            if module is not None:
                self.slots[id(module)] = (type(module), _meta_refs(module))
        self.owned = []


def _version(tensor: torch.Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # an inference tensor has no version counter
        return -1


#: Recordings by the storages they created (weakly: a recording lives as long as its modules).
_BY_STORAGE: weakref.WeakValueDictionary[int, Recording] = weakref.WeakValueDictionary()
#: Recordings by the id of a module registered inside their block (removed when it dies).
_OWNERS: dict[int, Recording] = {}


def disown(modules: Iterable[object]) -> None:
    """Stop keeping recordings alive for `modules` (materialised: nothing left to replay)."""
    for module in modules:
        _OWNERS.pop(id(module), None)


def recording_of(tensor: torch.Tensor) -> Recording | None:
    """The recording that created `tensor`'s storage, if a live one did."""
    return _BY_STORAGE.get(storage_key(tensor))


def replaced(
    module: torch.nn.Module, name: str, tensor: torch.Tensor
) -> tuple[str | None, str] | None:
    """What happened to `module`'s meta parameter or buffer `name` (now `tensor`, which no
    recording made) after a `deferred()` block, as far as devicekit can tell: the op that
    most likely did it (`"Module.to"`, `"copy.deepcopy"`, or `None` for an assignment) and
    words for an error message; `None` when no live block built `module` or one like it.

    A module the block registered held another tensor there when the block ended: one of the
    same shape and another dtype was cast (`Module.to(dtype)`), anything else was assigned.
    A module no block registered, whose type and meta tensors' names and shapes match one a
    live block registered, is most likely a copy of it (`copy.deepcopy`), cast too if the
    dtypes differ.
    """
    owner = _OWNERS.get(id(module))
    if owner is not None and id(module) in owner.slots:
        before = owner.slots[id(module)][1].get(name)
        if before is None:
            return None, "assigned after the deferred() block (it held no meta tensor there)"
        if before.shape == tuple(tensor.shape) and before.dtype != tensor.dtype:
            return "Module.to", (
                f"replaced after the deferred() block (cast from {before.dtype} to "
                f"{tensor.dtype}, by Module.to or Tensor.to?)"
            )
        return None, "replaced after the deferred() block (assigned a new tensor?)"
    layout = _layout_of(_meta_refs(module))
    for recording in {id(r): r for r in _OWNERS.values()}.values():
        for kind, refs in recording.slots.values():
            if kind is not type(module) or _layout_of(refs) != layout:
                continue
            before = refs.get(name)
            cast = (
                ""
                if before is None or before.dtype == tensor.dtype
                else f" and cast from {before.dtype} to {tensor.dtype}"
            )
            return "copy.deepcopy", (
                f"made after the deferred() block: its {type(module).__name__} matches one "
                f"built in the block, so it is most likely a copy of it (copy.deepcopy?{cast})"
            )
    return None


def _meta_refs(module: torch.nn.Module) -> dict[str, Ref]:
    """A `Ref` per meta parameter and buffer of `module` (not of its children), by name."""
    tensors = {**module._parameters, **module._buffers}
    return {n: Ref(t) for n, t in tensors.items() if t is not None and t.is_meta}


def _layout_of(refs: dict[str, Ref]) -> dict[str, tuple[int, ...]]:
    return {name: ref.shape for name, ref in refs.items()}


# --- the modes ------------------------------------------------------------------------------------


def _constructors() -> frozenset[Callable[..., Any]]:
    return frozenset(_device_constructors())


_CONSTRUCTORS: frozenset[Callable[..., Any]] = frozenset()


class _DefaultDevice(DeviceContext):
    """What `torch.get_default_device()` finds on the stack: the block's device. Allocations
    that torch's own Python code makes without `device=` (inside a recorded call) go to meta.

    Pushed and removed by identity (`devicekit._modes`), never entered: torch's own
    `DeviceContext.__enter__` moves itself to the bottom of the stack.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.prev_mode = None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = _META
        return func(*args, **kwargs)


# --- nn.init functions as single ops --------------------------------------------------------------

#: `torch.nn.init` functions that do not go through torch's function modes themselves. Some
#: read values (`trunc_normal_` rejects samples until all fall inside the bounds) or return
#: early on meta, so recording the ops inside them would fail or record nothing. While a block
#: records, each of these functions runs a trampoline that dispatches the call as one op (to a
#: copy of the function), which the recording mode records without running it, and replay runs
#: the copy on the real tensor. The functions themselves are changed (their `__code__`), not the
#: module's names, so references taken earlier (transformers keeps a table of them) dispatch too;
#: outside a recording the trampoline just calls the copy.
_INIT_WRAPPED = (
    "dirac_",
    "eye_",
    "kaiming_normal_",
    "ones_",
    "orthogonal_",
    "sparse_",
    "trunc_normal_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
)
_ATOMIC: set[Callable[..., Any]] = set()
_init_lock = threading.Lock()
_init_users = [0]
#: Each wrapped function, with its own code, defaults and keyword defaults, while wrapped.
_init_saved: list[tuple[types.FunctionType, types.CodeType, Any, Any]] = []


def _dispatch(
    original: Callable[..., Any], tensor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if has_torch_function_unary(tensor):
        return handle_torch_function(original, (tensor,), tensor, *args, **kwargs)
    return original(tensor, *args, **kwargs)


def _trampoline(
    tensor: Any,
    *args: Any,
    _devicekit_original: Any = None,
    _devicekit_dispatch: Any = None,
    **kwargs: Any,
) -> Any:
    # Runs as the code of an `nn.init` function: it may use nothing but its own arguments.
    return _devicekit_dispatch(_devicekit_original, tensor, args, kwargs)


def _copy(function: types.FunctionType) -> types.FunctionType:
    copied = types.FunctionType(
        function.__code__,
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copied.__kwdefaults__ = function.__kwdefaults__
    functools.update_wrapper(copied, function)
    return copied


def _dispatch_init(change: int) -> None:
    """Count a recording block in (+1) or out (-1); wrap `torch.nn.init` while any is in."""
    import torch.nn.init as init_module

    with _init_lock:
        _init_users[0] += change
        if _init_users[0] > 0 and not _init_saved:
            for name in _INIT_WRAPPED:
                function = getattr(init_module, name, None)
                if not isinstance(function, types.FunctionType) or function.__closure__:
                    continue
                copied = _copy(function)
                _ATOMIC.add(copied)
                saved = (function, function.__code__, function.__defaults__)
                _init_saved.append((*saved, function.__kwdefaults__))
                function.__code__ = _trampoline.__code__
                function.__defaults__ = None
                function.__kwdefaults__ = {
                    "_devicekit_original": copied,
                    "_devicekit_dispatch": _dispatch,
                }
        elif _init_users[0] <= 0 and _init_saved:
            for function, code, defaults, kwdefaults in _init_saved:
                function.__code__ = code
                function.__defaults__ = defaults
                function.__kwdefaults__ = kwdefaults
            _init_saved.clear()
            _ATOMIC.clear()


class _RecordingMode(TorchFunctionMode):
    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording
        self.device = recording.device
        tensor_class: Any = torch.Tensor
        self.spoofed: dict[Any, Callable[[torch.Tensor], object]] = {
            tensor_class.device.__get__: lambda tensor: self.device,
            tensor_class.is_meta.__get__: lambda tensor: False,
            tensor_class.is_cpu.__get__: lambda tensor: self.device.type == "cpu",
            tensor_class.is_cuda.__get__: lambda tensor: self.device.type == "cuda",
        }

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        spoof = self.spoofed.get(func)
        if spoof is not None:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
                return spoof(args[0])
            return func(*args, **kwargs)
        if func in _CONSTRUCTORS:
            device = kwargs.get("device")
            if device is None or self._is_target(device):
                kwargs["device"] = _META
        elif kwargs.get("device") is not None and self._is_target(kwargs["device"]):
            kwargs["device"] = _META
        args = tuple(_META if self._is_target(arg, strings=False) else arg for arg in args)
        if func is _TENSOR_TO:
            args = tuple(
                _META if isinstance(arg, str) and self._is_target(arg) else arg for arg in args
            )
        if _MOVES.get(func) == self.device.type and args and _is_meta(args[0]):
            return args[0]  # `.cuda()` / `.cpu()` to the device it is built for: already there
        metas = [t for t in tree_leaves((args, kwargs)) if _is_meta(t)]
        if func in _ATOMIC and args and _is_meta(args[0]):
            tensor: torch.Tensor = args[0]
            key = frozenset({storage_key(tensor)})
            args, kwargs = tree_map(_refs, (args, kwargs))
            self.recording.add(Op(func, args, kwargs, [Ref(tensor)], key, key), [])
            return tensor
        before = [_version(t) for t in metas]
        try:
            result = func(*args, **kwargs)
        except Exception as error:
            if not metas:
                raise
            raise _unrecordable(func, metas, error) from error
        outputs, _ = tree_flatten(result)
        created = [t for t in outputs if _is_meta(t)]
        changed = [t for t, version in zip(metas, before, strict=True) if _version(t) != version]
        if created or changed:
            if func is _DEEPCOPY:  # replayed with a memo of its own
                args = args[:1]
                kwargs = {}
            reads = frozenset(map(storage_key, metas))
            writes = frozenset(map(storage_key, created + changed))
            kept = [Ref(t) if _is_meta(t) else None if _is_tensor(t) else t for t in outputs]
            args, kwargs = tree_map(_refs, (args, kwargs))
            self.recording.add(Op(func, args, kwargs, kept, reads, writes), created)
        return result

    def _is_target(self, value: object, *, strings: bool = True) -> bool:
        if isinstance(value, torch.device):
            return value == self.device or value.type == "meta"
        if strings and isinstance(value, str):
            try:
                device = resolve(value, operation="deferred", check=False)
            except Exception:
                return False
            return device == self.device or device.type == "meta"
        return False


_TENSOR_TO = torch.Tensor.to
_MOVES: dict[Any, str] = {torch.Tensor.cpu: "cpu", torch.Tensor.cuda: "cuda"}
_DEEPCOPY = torch.Tensor.__deepcopy__


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def _is_meta(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def _unrecordable(
    func: Callable[..., Any], metas: list[torch.Tensor], error: BaseException
) -> MaterializeError:
    name = op_name(func)
    building = _module_being_built()
    site = user_call_site()
    where = "" if site is None else f" at {site}"
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return MaterializeError(
        f"deferred(): {building} ran {name} on {describe_tensor(metas[0])}{where}, which "
        f"failed on meta ({type(error).__name__}: {cause}). Initialisation that reads tensor "
        "values (.item(), .tolist(), bool(), copying to another device) cannot be recorded: "
        "compute the value from Python numbers, or build this module outside "
        "devicekit.deferred(). The original error is attached as __cause__.",
        path=building,
        op=name,
    )


def _module_being_built() -> str:
    """`"Rotary.__init__"`: the innermost method of an `nn.Module` on the stack."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            return f"{type(owner).__name__}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "the code"


# --- the block ------------------------------------------------------------------------------------

_ACTIVE: ContextVar[Recording | None] = ContextVar("devicekit_deferred", default=None)


class _DeferredKind(Kind[Recording]):
    def hold(self, record: Record) -> None:
        recording: Recording = record.value
        record.held = recording
        recording.start()

    def release(self, record: Record) -> None:
        recording = record.held
        record.held = None
        if isinstance(recording, Recording):
            recording.stop()


_KIND = _DeferredKind("deferred()", _ACTIVE, release_on_exit=True)


class deferred(Scoped[Recording]):
    """Build modules without allocating memory, recording their initialisation for replay.

    Inside the block, tensors created without an explicit device (and so every parameter and
    buffer of a module built there) live on `meta`, and every torch call that creates or
    changes them is recorded. `devicekit.materialize(model, device)` then allocates each
    storage once on `device` and replays the recording there, so parameters and buffers get
    exactly the values eager construction on `device` gives with the same seed, tied weights
    stay tied, and buffers computed in `__init__` are computed.

    Code inside the block sees `device` as the device it builds on (`Tensor.device`,
    `torch.get_default_device()`), so libraries that skip initialisation on meta initialise as
    in eager construction. Only the calling thread records; the block is scoped like
    `devicekit.default_device`, and is also a decorator.

    Args:
        device: The device the model is built for (anything `devicekit.as_device` accepts);
            `None` means `devicekit.current_device()`. Values come from the device
            `materialize` is given; this one only answers device queries during building.

    Raises:
        MaterializeError: Inside the block, initialisation read the values of a meta tensor
            (`.item()`, `.tolist()`, `bool()`); the message names the module and the op.
        InvalidDeviceSpecError: `device` is malformed.
        DeviceUnavailableError: `device` is not on this machine.

    Example:
        >>> import torch, devicekit
        >>> torch.manual_seed(0) and None
        >>> with devicekit.deferred():
        ...     model = torch.nn.Linear(2, 2)
        >>> model.weight.is_meta
        True
        >>> devicekit.materialize(model, "cpu").weight.device
        device(type='cpu')
        >>> torch.manual_seed(0) and None
        >>> torch.equal(model.weight, torch.nn.Linear(2, 2).weight)
        True
    """

    kind = _KIND
    __slots__ = ("device",)

    def __init__(self, device: DeviceLike = None) -> None:
        global _CONSTRUCTORS
        if not _CONSTRUCTORS:
            _CONSTRUCTORS = _constructors()
        if device is None:
            from devicekit._context import current_device

            self.device = current_device()
        else:
            self.device = resolve(device, operation="deferred")

    def __repr__(self) -> str:
        return f"devicekit.deferred({str(self.device)!r})"

    def _value(self) -> Recording:
        return Recording(self.device)
