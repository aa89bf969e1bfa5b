"""`materialize` returns the module it was given, typed as given; checked by `mypy --strict`
(never run)."""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import devicekit

with devicekit.deferred("cpu") as block:
    assert_type(block, devicekit.deferred)
    linear = torch.nn.Linear(2, 2)

assert_type(devicekit.materialize(linear, "cpu"), torch.nn.Linear)
assert_type(devicekit.materialize(linear, init="reset"), torch.nn.Linear)
assert_type(devicekit.materialize(linear, torch.device("cpu"), init=None), torch.nn.Linear)
devicekit.materialize(linear, init="zeros")  # type: ignore[arg-type]
devicekit.materialize(torch.ones(1))  # type: ignore[type-var]


@devicekit.deferred()
def build(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(width, width))


assert_type(build(4), torch.nn.Sequential)
