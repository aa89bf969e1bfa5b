"""Type aliases and protocols shared by devicekit's modules."""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias, TypeVar, runtime_checkable

import torch

__all__ = ["DeviceLike", "SupportsTo", "T"]

#: Everything `devicekit.as_device` accepts, and the type of every public `device` parameter:
#: a spec string (`"auto"`, `"cpu"`, `"cuda:1"`, `"gpu"`), an accelerator index, a
#: `torch.device`, or `None` for the current default device. Floats, bytes and other values are
#: type errors (and `InvalidDeviceSpecError`s at run time); `devicekit._resolve.resolve` reads them.
DeviceLike: TypeAlias = str | int | torch.device | None

T = TypeVar("T")


@runtime_checkable
class SupportsTo(Protocol):
    """An object with a `.to(device, ...)` method, such as a tensor, a module or a TensorDict."""

    def to(self, *args: Any, **kwargs: Any) -> Any: ...
