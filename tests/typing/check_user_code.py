"""The types a training script relies on end to end, checked by `mypy --strict` (never run).

Complements the per-module checks: the exact tuple `colocate` returns, async `@colocated`, and
every decorator's result being assignable to the precise callable type of the function it wraps.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import torch
from typing_extensions import assert_type

import devicekit

model = torch.nn.Linear(2, 2)
batch = {"points": torch.ones(4, 2), "labels": torch.zeros(4, dtype=torch.long)}

# to_device keeps the argument's type: modules stay their own class, batches their own shape.
assert_type(devicekit.to_device(model), torch.nn.Linear)
assert_type(devicekit.to_device(batch, devicekit.local_device()), dict[str, torch.Tensor])
assert_type(devicekit.to_device([batch], "meta"), list[dict[str, torch.Tensor]])

# colocate returns a tuple of exactly its arguments' types.
assert_type(
    devicekit.colocate(model, batch, torch.ones(1), "tag"),
    tuple[torch.nn.Linear, dict[str, torch.Tensor], torch.Tensor, str],
)
assert_type(devicekit.colocate(), tuple[()])


@devicekit.colocated
async def predict(net: torch.nn.Module, points: torch.Tensor, *, top: int = 1) -> torch.Tensor:
    return net(points).topk(top).indices  # type: ignore[no-any-return]


@devicekit.default_device("cpu")
@devicekit.device_guard("error")
@devicekit.colocated(device="cpu")
def train_step(net: torch.nn.Module, points: torch.Tensor, lr: float = 0.1) -> float:
    return lr


# Stacked decorators keep the exact signature, sync and async.
_sync: Callable[[torch.nn.Module, torch.Tensor, float], float] = train_step
_async: Callable[..., Coroutine[Any, Any, torch.Tensor]] = predict
assert_type(train_step(model, batch["points"]), float)
coroutine = predict(model, batch["points"], top=2)
_ = assert_type(coroutine, Coroutine[Any, Any, torch.Tensor])
coroutine.close()
train_step(model, batch["points"], lr="fast")  # type: ignore[arg-type]
_ = predict(model, batch["points"], 2)  # type: ignore[call-arg]  # `top` is keyword-only
_ = predict(model, top="2")  # type: ignore[call-arg, arg-type]
