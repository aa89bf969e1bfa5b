"""Types users rely on for guards, checked by `mypy --strict` (never executed)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import torch
from typing_extensions import assert_type

import devicekit


@devicekit.device_guard()
def step(x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    return x * scale


@devicekit.device_guard("move", target="meta")
async def astep(x: torch.Tensor) -> torch.Tensor:
    return x


signature: Callable[[torch.Tensor], torch.Tensor] = step  # the signature survives decoration
assert_type(step(torch.ones(2), scale=2.0), torch.Tensor)
coroutine = astep(torch.ones(2))
_ = assert_type(coroutine, Coroutine[Any, Any, torch.Tensor])

with devicekit.device_guard("warn") as guard:
    assert_type(guard, devicekit.device_guard)

policy: devicekit.GuardPolicy = "error"
devicekit.device_guard(policy)
step("not a tensor")  # type: ignore[arg-type]
step(torch.ones(2), scale="x")  # type: ignore[arg-type]


@devicekit.transfer_guard("log")
def read(x: torch.Tensor) -> float:
    return x.item()


assert_type(read(torch.ones(())), float)
transfer_policy: devicekit.TransferPolicy = "disallow"
with devicekit.transfer_guard(transfer_policy) as transfers:
    assert_type(transfers, devicekit.transfer_guard)
devicekit.transfer_guard("error")  # type: ignore[arg-type]

x_, w_, n_ = devicekit.colocate(torch.ones(2), {"w": torch.ones(2)}, 3, device="meta")
assert_type(x_, torch.Tensor)
assert_type(w_, dict[str, torch.Tensor])
assert_type(n_, int)


@devicekit.colocated
def affine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


@devicekit.colocated(device="meta")
def scaled(x: torch.Tensor, *, by: float) -> torch.Tensor:
    return x * by


assert_type(affine(torch.ones(2), torch.ones(2)), torch.Tensor)
assert_type(scaled(torch.ones(2), by=2.0), torch.Tensor)
scaled(torch.ones(2), by="x")  # type: ignore[arg-type]
