"""Types of the default-device API, checked by `mypy --strict` (never executed)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import torch
from typing_extensions import assert_type

import devicekit


@devicekit.default_device("meta")
def build(width: int, *, bias: bool = True) -> torch.nn.Linear:
    return torch.nn.Linear(width, width, bias=bias)


@devicekit.default_device(torch.device("cpu"))
async def fetch(size: int) -> torch.Tensor:
    return torch.empty(size)


def load(path: str, size: int = 1) -> torch.Tensor:
    return torch.empty(size)


assert_type(build(3, bias=False), torch.nn.Linear)
build("3")  # type: ignore[arg-type]  # the signature survives: a wrong argument is an error
build(3, False)  # type: ignore[call-arg]  # keyword-only stays keyword-only
coroutine = fetch(3)
_ = assert_type(coroutine, Coroutine[Any, Any, torch.Tensor])
coroutine.close()
assert_type(devicekit.carry_default_device(load)("x", size=2), torch.Tensor)
with devicekit.default_device("meta") as device:
    assert_type(device, torch.device)
assert_type(devicekit.default_device(0).device, torch.device)
