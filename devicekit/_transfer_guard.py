"""`transfer_guard()`: catch implicit copies between an accelerator and the host.

`.item()`, `.tolist()`, `bool(t)` and friends on an accelerator tensor copy it to the host and
wait for the device to finish; `torch.tensor([...], device="cuda")` copies Python data to the
device. Inside a training step these are usually accidents that serialise host and device. The
guard is a torch function mode that looks up each op in a small table and only then looks at
its tensor, so ops that are not on the list cost one dictionary lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch.overrides import TorchFunctionMode

from devicekit._describe import CallSite, describe_tensor, op_name, user_call_site
from devicekit._errors import InvalidArgumentError, TransferGuardError
from devicekit._modes import ModeKind
from devicekit._scope import Scoped

__all__ = ["TransferPolicy", "transfer_guard"]

#: What `transfer_guard` does with an implicit transfer: raise, or log and let it happen.
TransferPolicy = Literal["disallow", "log"]

logger = logging.getLogger("devicekit")

#: The innermost active `transfer_guard` policy of this thread or asyncio task.
_ACTIVE_TRANSFER_GUARD: ContextVar[TransferPolicy | None] = ContextVar(
    "devicekit_transfer_guard", default=None
)

_TO_HOST = "to_host"
_FROM_DATA = "from_data"

# Reading a tensor's values on the host: each is a device-to-host copy and a synchronisation.
_KINDS: dict[object, str] = {
    getattr(torch.Tensor, name): _TO_HOST
    for name in (
        "item",
        "tolist",
        "numpy",
        "__array__",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
    )
    if hasattr(torch.Tensor, name)
}
# Building a tensor from Python or NumPy data: on an accelerator, a host-to-device copy.
_KINDS.update({torch.tensor: _FROM_DATA, torch.as_tensor: _FROM_DATA})
_KINDS[torch.Tensor.new_tensor] = _FROM_DATA


@dataclass(frozen=True)
class Transfer:
    """An implicit transfer: the op as users write it and what it copies."""

    operation: str
    tensor: str
    direction: Literal["to the host", "to the device"]
    device: torch.device


def _is_host(device: torch.device) -> bool:
    # Only the CPU is the host: `meta` counts as a device, so CPU-only test runs can exercise
    # the guard with meta tensors.
    return device.type == "cpu"


def implicit_transfer(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Transfer | None:
    """The implicit transfer an op call would make, or `None` for every other call.

    Example:
        >>> import torch
        >>> implicit_transfer(torch.Tensor.item, (torch.ones((), device="meta"),), {})
        Transfer(operation='Tensor.item', tensor='f32[] @ meta', direction='to the host', device=device(type='meta'))
        >>> implicit_transfer(torch.Tensor.item, (torch.ones(()),), {}) is None
        True
    """  # noqa: E501
    kind = _KINDS.get(func)
    if kind is None:
        return None
    if kind == _TO_HOST:
        tensor = args[0] if args else None
        if isinstance(tensor, torch.Tensor) and not _is_host(tensor.device):
            return Transfer(op_name(func), describe_tensor(tensor), "to the host", tensor.device)
        return None
    return _from_data(func, args, kwargs)


def _from_data(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Transfer | None:
    if func is torch.Tensor.new_tensor:
        source, data = args[0], (args[1] if len(args) > 1 else kwargs.get("data"))
        spec = kwargs.get("device", source.device)
    else:
        data = args[0] if args else kwargs.get("data")
        spec = kwargs.get("device")
    if isinstance(data, torch.Tensor):
        return None  # a tensor given to `as_tensor`/`tensor` is an explicit move
    device = torch.get_default_device() if spec is None else torch.device(spec)
    if _is_host(device):
        return None
    return Transfer(op_name(func), f"{type(data).__name__} data", "to the device", device)


def _message(transfer: Transfer, site: CallSite | None) -> str:
    where = f"called at {site}" if site is not None else "called at an unknown line"
    if transfer.direction == "to the host":
        return (
            f"transfer_guard: {transfer.operation} copies {transfer.tensor} to the host, "
            "an implicit transfer that waits for the device.\n"
            f"{where}\n"
            'Fix: copy it explicitly where you mean to, with `devicekit.to_device(tensor, "cpu")` '
            'or `.cpu()`, or allow it in this block with `devicekit.transfer_guard("log")`.'
        )
    return (
        f"transfer_guard: {transfer.operation} builds a tensor on {transfer.device} from "
        f"{transfer.tensor}, an implicit host-to-device copy.\n"
        f"{where}\n"
        "Fix: build it on the CPU and move it explicitly, e.g. "
        f'`devicekit.to_device(torch.tensor(data), "{transfer.device}")`, or allow it in this '
        'block with `devicekit.transfer_guard("log")`.'
    )


class _TransferGuardMode(TorchFunctionMode):
    """Raises or logs for implicit transfers while a `transfer_guard` is active."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        if func in _KINDS:
            policy = _KIND.current()
            transfer = None if policy is None else implicit_transfer(func, args, kwargs)
            if transfer is not None:
                site = user_call_site()
                message = _message(transfer, site)
                if policy == "disallow":
                    raise TransferGuardError(
                        message,
                        operation=transfer.operation,
                        tensor=transfer.tensor,
                        location=str(site) if site is not None else None,
                    )
                logger.warning(message)
        return func(*args, **kwargs)


_KIND: ModeKind[TransferPolicy] = ModeKind(
    "transfer_guard()", _ACTIVE_TRANSFER_GUARD, _TransferGuardMode
)


class transfer_guard(Scoped[TransferPolicy]):
    """Catch implicit copies between an accelerator and the host inside the block.

    Inside the block, these raise `TransferGuardError` (`"disallow"`) or are logged on the
    `devicekit` logger at WARNING level (`"log"`) when their tensor is not on the CPU:
    `.item()`, `.tolist()`, `.numpy()`, `bool(t)` and `if t:`, `float(t)`, `int(t)`, and
    building an accelerator tensor from Python or NumPy data
    (`torch.tensor([...], device="cuda")`, also through a default device). Explicit moves stay
    allowed: `devicekit.to_device`, `.to()`, `.cpu()`, `copy_`. `meta` counts as a device here, so
    CPU-only tests can check that a code path stays on the device.

    Scoping is as for `device_guard`: per thread and asyncio task, nestable, restored on exit;
    usable as a decorator of functions and coroutine functions.

    Args:
        policy: `"disallow"` or `"log"`.

    Raises:
        ValueError: `policy` is not one of the two.

    Example:
        >>> import torch, devicekit
        >>> loss = torch.ones((), device="meta")
        >>> with devicekit.transfer_guard():
        ...     loss.item()
        Traceback (most recent call last):
        ...
        devicekit._errors.TransferGuardError: transfer_guard: Tensor.item copies f32[] @ meta to the host, an implicit transfer that waits for the device.
        ...
    """  # noqa: E501

    kind = _KIND

    def __init__(self, policy: TransferPolicy = "disallow") -> None:
        if policy not in get_args(TransferPolicy):
            raise InvalidArgumentError(
                f"transfer_guard: unknown policy {policy!r}; expected 'disallow' or 'log'."
            )
        self.policy: TransferPolicy = policy

    def __repr__(self) -> str:
        return f"transfer_guard({self.policy!r})"

    def _value(self) -> TransferPolicy:
        return self.policy
