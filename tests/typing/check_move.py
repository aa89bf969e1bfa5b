"""`to_device` keeps the static type of what it moves; checked by `mypy --strict` (never run)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from typing_extensions import assert_type

import devicekit


@dataclass
class Batch:
    inputs: torch.Tensor


class Point(NamedTuple):
    x: torch.Tensor


tensor = torch.ones(1)
assert_type(devicekit.to_device(tensor, "cpu"), torch.Tensor)
assert_type(devicekit.to_device({"x": tensor}), dict[str, torch.Tensor])
assert_type(devicekit.to_device([tensor], torch.device("meta")), list[torch.Tensor])
assert_type(devicekit.to_device((tensor, 1), 0, non_blocking=True), tuple[torch.Tensor, int])
assert_type(devicekit.to_device(Batch(tensor), dtype=torch.float16), Batch)
assert_type(devicekit.to_device(Point(tensor), skip={"x"}, strict=True), Point)
assert_type(
    devicekit.to_device(OrderedDict(x=tensor), skip=callable), OrderedDict[str, torch.Tensor]
)
assert_type(devicekit.to_device(torch.nn.Linear(1, 1), "cpu"), torch.nn.Linear)
assert_type(devicekit.devices_of(tensor), dict[torch.device, Sequence[str]])
assert_type(devicekit.find_device(tensor), torch.device | None)
devicekit.register_mover(Batch, lambda b: ({"inputs": b.inputs}, lambda m: Batch(**m)))
