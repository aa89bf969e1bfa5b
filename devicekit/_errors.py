"""The devicekit exception and warning hierarchy.

Every error devicekit raises is a `DevicekitError`, and also the built-in exception a torch
user already catches for that kind of mistake: a malformed device spec is a `ValueError`, a
device that is not there or a device mismatch is a `RuntimeError` (as torch raises for
`cuda` tensors meeting `cpu` ones), an object devicekit cannot rebuild is a `TypeError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "AuditError",
    "CrossDeviceError",
    "DeviceMismatchWarning",
    "DeviceMoveWarning",
    "DeviceUnavailableError",
    "DevicekitError",
    "DevicekitWarning",
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
]


class DevicekitError(Exception):
    """Base class of every exception devicekit raises.

    Example:
        >>> import devicekit
        >>> try:
        ...     devicekit.as_device("cuda:x")
        ... except devicekit.DevicekitError as error:
        ...     print(type(error).__name__)
        InvalidDeviceSpecError
    """


class InvalidDeviceSpecError(DevicekitError, ValueError):
    """A device spec is malformed or of an unsupported type (`"cuda:x"`, `3.5`, `""`).

    Attributes:
        spec: The value that was given.
    """

    def __init__(self, message: str, *, spec: object) -> None:
        super().__init__(message)
        self.spec = spec


class DeviceUnavailableError(DevicekitError, RuntimeError):
    """A well-formed device spec names a device this machine does not have (`"cuda:7"`).

    Attributes:
        device: The device that was asked for.
        available: The devices that are available instead.
    """

    def __init__(self, message: str, *, device: object, available: tuple[object, ...]) -> None:
        super().__init__(message)
        self.device = device
        self.available = available


class InvalidArgumentError(DevicekitError, ValueError):
    """An argument other than a device spec has a value devicekit does not accept.

    For example an unknown guard policy, or a generator function given to a decorator that
    cannot scope it.
    """


class ScopeError(DevicekitError, RuntimeError):
    """A devicekit block was left from a thread or asyncio task in which it is not active."""


class MixedDevicesError(DevicekitError, RuntimeError):
    """An object was expected to live on one device but its tensors are spread over several.

    Attributes:
        devices: Each device found, mapped to the paths of the tensors on it
            (`{device(type='cpu'): ["batch['ids']"], ...}`).
    """

    def __init__(self, message: str, *, devices: Mapping[Any, Sequence[str]]) -> None:
        super().__init__(message)
        self.devices = dict(devices)


class MoveError(DevicekitError, RuntimeError):
    """Moving one tensor or object failed; the original error is the `__cause__`.

    Attributes:
        path: Where the value sits in the moved structure (`"batch['inputs'][2]"`), or `None`
            when the failure is not about one value (an invalid argument).
        nbytes: The bytes that were being moved, where known.
        device: The target device.
    """

    def __init__(self, message: str, *, path: str | None, nbytes: int | None, device: Any) -> None:
        super().__init__(message)
        self.path = path
        self.nbytes = nbytes
        self.device = device


class UnmovableError(DevicekitError, TypeError):
    """An object holds tensors that devicekit cannot rebuild on another device.

    Attributes:
        path: Where the object sits in the structure (`"batch['meta'].cache"`), or `None` when
            the problem is not about one value (a bad `register_mover` call).
        obj: The object itself.
    """

    def __init__(self, message: str, *, path: str | None, obj: object) -> None:
        super().__init__(message)
        self.path = path
        self.obj = obj


@dataclass(frozen=True)
class Provenance:
    """Where one operand of a cross-device error came from, as far as devicekit can tell.

    While a `device_guard` or a simulation is active, devicekit records the user's line of every
    tensor factory call (`torch.arange`, `torch.zeros`, `torch.tensor`, ...); when an op mixes
    devices it looks up each offending operand in that record, in the modules and optimizers on
    the stack, and in the caller's variables.

    Attributes:
        label: The operand as the op names it (`"other"`, `"weight"`, `"tensors[1]"`).
        device: Where the operand is (the simulated device under a simulation).
        origin: How it came to be, one of `"made"` (a factory call inside the block made it, or
            the value it was computed from), `"moved"` (a `.to()`/`.cpu()`/`.cuda()` inside the
            block put it there), `"returned"` (library code the user's line called made it:
            `torch.load`, `default_collate`; `op` is that call), `"assigned"` (the line that
            assigned the variable holding it;
            no factory was recorded there), `"argument"` (it was passed into the function
            that uses it) or `"outside"` (nothing inside the block made it: it was passed in,
            loaded or made before the block).
        op: The factory or move that made it (`"torch.arange"`), or `None`.
        location: The line that made or assigned it (`"model.py:41: pos = torch.arange(t)"`),
            or `None`.
        via: The expression on the failing line it was computed from (`"self.mask"`) when the
            operand itself is an intermediate result, else `None`.
        owner: Where it is held (`"model.blocks[3].attn.mask"`, `"batch['labels']"`), or
            `None`.
        owner_kind: What holds it: `"parameter"`, `"buffer"`, `"attribute"` (a plain attribute
            of a module, which `Module.to` does not move), `"list item"`, `"dict item"`,
            `"optimizer state"`, `"local variable"` or `"argument"`; `None` with no owner.

    Example:
        >>> import torch, devicekit
        >>> with devicekit.simulated_devices("cuda", 1):
        ...     x = torch.ones(2, device="cuda")
        ...     try:
        ...         x + torch.zeros(2)
        ...     except devicekit.CrossDeviceError as error:
        ...         (found,) = error.provenance
        >>> found.label, found.origin, found.op
        ('other', 'made', 'torch.zeros')
    """

    label: str
    device: str
    origin: Literal["made", "moved", "returned", "assigned", "argument", "outside"]
    op: str | None = None
    location: str | None = None
    via: str | None = None
    owner: str | None = None
    owner_kind: str | None = None


class CrossDeviceError(DevicekitError, RuntimeError):
    """A torch operation received tensors on different devices.

    Raised by `device_guard`, by simulated devices and by `colocate`, all with one format: torch's
    own sentence first (`"Expected all tensors to be on the same device, ..."`), then the op,
    each operand with where it came from, the user's line and a fix for the pattern found.

    Attributes:
        op: The op as users write it (`"torch.nn.functional.linear"`, `"Tensor.__matmul__"`).
        operands: Each tensor operand as `(label, compact form)`:
            `("weight", "f32[32,64] @ cuda:0")`.
        devices: The distinct devices that met, in order of appearance.
        location: The user's source line that called the op (`"train.py:12: y = f(x)"`), or
            `None` where there is none.
        provenance: Where each offending operand came from (`Provenance`), in operand order.
    """

    def __init__(
        self,
        message: str,
        *,
        op: str,
        operands: tuple[tuple[str, str], ...],
        devices: tuple[object, ...],
        location: str | None,
        provenance: tuple[Provenance, ...] = (),
    ) -> None:
        super().__init__(message)
        self.op = op
        self.operands = operands
        self.devices = devices
        self.location = location
        self.provenance = provenance


class TransferGuardError(DevicekitError, RuntimeError):
    """An implicit accelerator-host transfer happened inside `transfer_guard`.

    Raised for `.item()`, `.tolist()`, `bool(t)` and similar host syncs.

    Attributes:
        operation: The operation as users write it (`"Tensor.item"`, `"torch.tensor"`).
        tensor: The compact form of the tensor involved (`"f32[] @ cuda:0"`).
        location: The user's source line, or `None` where there is none.
    """

    def __init__(self, message: str, *, operation: str, tensor: str, location: str | None) -> None:
        super().__init__(message)
        self.operation = operation
        self.tensor = tensor
        self.location = location


class SimulationError(DevicekitError, RuntimeError):
    """Simulated devices were requested in a way that cannot work.

    For example, simulating a device type the machine really has.
    """


class RaceError(SimulationError):
    """`simulated_devices(..., races=True)` found a stream race: an op reads data that work on
    another stream (or a `non_blocking` copy) may not have finished writing, overwrites data
    still being read, or memory is freed while another stream may still use it.

    Attributes:
        op: The op that raced (`"free"` for memory freed too early).
        stream: The stream (or `"the host"`) that ran it.
        other: The unfinished op it raced with, and its stream.
        location: The user's line that ran `op`, if known.
    """

    def __init__(
        self, message: str, *, op: str, stream: str | None, other: str | None, location: str | None
    ) -> None:
        super().__init__(message)
        self.op = op
        self.stream = stream
        self.other = other
        self.location = location


class AuditError(DevicekitError, AssertionError):
    """`devicekit.testing.assert_movable` found device bugs in a model; the message lists them.

    An `AssertionError`, so that pytest and unittest report it as a failed test.

    Attributes:
        report: The findings that failed the check (a `devicekit.AuditReport`).
    """

    def __init__(self, message: str, *, report: Any) -> None:
        super().__init__(message)
        self.report = report


class MaterializeError(DevicekitError, RuntimeError):
    """A module built on `meta` cannot be materialised faithfully (`devicekit.materialize`).

    Raised when an initialisation op was not recorded, a module was changed between building it
    under `devicekit.deferred()` and materialising it, or initialisation read the values of a
    meta tensor while it was being recorded.

    Attributes:
        path: The parameter, buffer or module concerned (`"model.head.weight"`), or `None`
            when the problem is not about one value.
        op: The torch operation concerned (`"Tensor.item"`), or `None`.
    """

    def __init__(self, message: str, *, path: str | None, op: str | None) -> None:
        super().__init__(message)
        self.path = path
        self.op = op


class DevicekitWarning(UserWarning):
    """Base class of every warning devicekit issues."""


class DeviceMismatchWarning(DevicekitWarning):
    """A torch operation received tensors on different devices (`device_guard("warn")`)."""


class DeviceMoveWarning(DevicekitWarning):
    """`device_guard("move")` moved an operand to another device to run an operation."""


class MaterializeWarning(DevicekitWarning):
    """`devicekit.materialize(init="reset")` left some modules' tensors uninitialised.

    Attributes:
        paths: The modules that hold parameters or buffers and have no `reset_parameters()`
            (`("model.rotary",)`).
    """

    def __init__(self, message: str, *, paths: tuple[str, ...]) -> None:
        super().__init__(message)
        self.paths = paths
