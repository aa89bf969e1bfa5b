"""The current default device: the innermost `default_device` block, else `"auto"`."""

from __future__ import annotations

import os
from contextvars import ContextVar

import torch

from devicekit._discovery import ENV_DEVICE, accelerator_type, best_device

__all__ = ["current_device"]

#: The innermost active `default_device` of this thread or asyncio task (`None`: none active).
_ACTIVE: ContextVar[torch.device | None] = ContextVar("devicekit_default_device", default=None)

# "auto" is resolved once per configuration, so that consecutive batches of one process never
# land on different accelerators because free memory changed in between.
_auto_cache: dict[tuple[str | None, str | None, str | None], torch.device] = {}


def _auto_device() -> torch.device:
    key = (os.environ.get(ENV_DEVICE), os.environ.get("LOCAL_RANK"), accelerator_type())
    device = _auto_cache.get(key)
    if device is None:
        device = _auto_cache[key] = best_device()
    return device


def current_device() -> torch.device:
    """The device devicekit uses when none is given.

    The innermost active `default_device` block of this thread or asyncio task, else the
    `DEVICEKIT_DEVICE` environment variable, else `devicekit.best_device` (resolved once
    per process and configuration, so it does not change between training steps).

    Example:
        >>> import devicekit
        >>> devicekit.current_device().type in ("cpu", "cuda", "mps", "xpu")
        True
    """
    device = _ACTIVE.get()
    return _auto_device() if device is None else device
