"""Types users rely on with simulated devices and the strategies, checked by `mypy --strict`."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from typing_extensions import assert_type

import devicekit
from devicekit import testing

with devicekit.simulated_devices("cuda", 2) as simulated:
    assert_type(simulated, list[torch.device])


@devicekit.simulated_devices("cuda", 2)
def train(steps: int, *, lr: float = 0.1) -> list[float]:
    return [lr] * steps


assert_type(train(3, lr=0.5), list[float])
assert_type(testing.tensors(), st.SearchStrategy[torch.Tensor])
assert_type(testing.available_devices(), st.SearchStrategy[torch.device])
assert_type(testing.device_specs(valid=False), st.SearchStrategy[object])
assert_type(testing.nested_batches(max_depth=2), st.SearchStrategy[object])
assert_type(testing.DTYPES, tuple[torch.dtype, ...])
