"""Types users rely on, checked by `mypy --strict` (never executed)."""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import devicekit

assert_type(devicekit.as_device("cuda:1"), torch.device)
assert_type(devicekit.as_device(None, check=False), torch.device)
assert_type(devicekit.best_device(), torch.device)
assert_type(devicekit.local_device(), torch.device)
assert_type(devicekit.current_device(), torch.device)
assert_type(devicekit.devices(), list[devicekit.DeviceInfo])
assert_type(devicekit.devices()[0].free_memory, int | None)

# `device` parameters take a `DeviceLike`; anything else is a type error (an unused ignore
# would be one too, under `mypy --strict`'s warn_unused_ignores).
device: devicekit.DeviceLike = "cuda:0"
assert_type(devicekit.to_device(torch.ones(1), device), torch.Tensor)
assert_type(devicekit.to_device(torch.ones(1), torch.device("meta")), torch.Tensor)
devicekit.to_device(torch.ones(1), 3.5)  # type: ignore[arg-type]
devicekit.to_device(torch.ones(1), device=b"cpu")  # type: ignore[arg-type]
devicekit.as_device(3.5)  # type: ignore[arg-type]
devicekit.default_device(3.5)  # type: ignore[arg-type]
devicekit.device_guard(target=3.5)  # type: ignore[arg-type]
devicekit.colocate(torch.ones(1), device=3.5)  # type: ignore[arg-type]
