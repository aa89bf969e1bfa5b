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
