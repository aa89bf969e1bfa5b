"""Tensors made inside `forward` without `device=`: one case per factory, and a few shapes of it.

In each program, `fixed` decides the one thing the fix changes, on the marked line itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tests.bug_corpus import Case, Held

DEV = "cuda:0"


def _on(fixed: bool, like: torch.Tensor) -> torch.device | None:
    return like.device if fixed else None


class Positions(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.tok = nn.Embedding(16, 8)
        self.pos = nn.Embedding(16, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        # <- arange_positions: the statement below makes the stray tensor
        pos = torch.arange(t, device=_on(self.fixed, idx))
        return self.tok(idx) + self.pos(pos)


def arange_positions(fixed: bool, held: Held) -> object:
    model = held.audit = Positions(fixed).to(DEV)
    return model(torch.zeros(2, 5, dtype=torch.long, device=DEV))


class InlinePositions(Positions):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        # <- arange_inline: the statement below makes the stray tensor
        return self.tok(idx) + self.pos(torch.arange(t, device=_on(self.fixed, idx)))


def arange_inline(fixed: bool, held: Held) -> object:
    model = held.audit = InlinePositions(fixed).to(DEV)
    return model(torch.zeros(2, 5, dtype=torch.long, device=DEV))


class CausalAttention(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = q @ k.transpose(1, 2)
        # <- ones_mask_tril: the statement below makes the stray tensor
        mask = torch.ones(t, t, device=_on(self.fixed, x)).tril()
        att = att.masked_fill(mask == 0, float("-inf"))
        return att.softmax(-1) @ v


def ones_mask_tril(fixed: bool, held: Held) -> object:
    model = held.audit = CausalAttention(fixed).to(DEV)
    return model(torch.randn(2, 4, 8, device=DEV))


class Recurrent(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.cell = nn.GRUCell(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- zeros_hidden: the statement below makes the stray tensor
        h = torch.zeros(x.size(0), 16, device=_on(self.fixed, x))
        for step in range(x.size(1)):
            h = self.cell(x[:, step], h)
        return h


def zeros_hidden(fixed: bool, held: Held) -> object:
    model = held.audit = Recurrent(fixed).to(DEV)
    return model(torch.randn(2, 3, 8, device=DEV))


class Scaled(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- tensor_from_list: the statement below makes the stray tensor
        scale = torch.tensor([1.0, 2.0, 0.5], device=_on(self.fixed, x))
        return self.linear(x) * scale


def tensor_from_list(fixed: bool, held: Held) -> object:
    model = held.audit = Scaled(fixed).to(DEV)
    return model(torch.randn(2, 8, device=DEV))


class Biased(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        # <- full_bias: the statement below makes the stray tensor
        bias = torch.full((scores.size(-1),), -1e4, device=_on(self.fixed, scores))
        return (scores + bias).softmax(-1)


def full_bias(fixed: bool, held: Held) -> object:
    model = held.audit = Biased(fixed).to(DEV)
    return model(torch.randn(2, 6, device=DEV))


class Accumulate(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- empty_accumulator: the statement below makes the stray tensor
        total = torch.empty(x.shape, device=_on(self.fixed, x)).zero_()
        for layer in self.layers:
            total += layer(x)
        return total


def empty_accumulator(fixed: bool, held: Held) -> object:
    model = held.audit = Accumulate(fixed).to(DEV)
    return model(torch.randn(2, 8, device=DEV))


class Noisy(nn.Module):
    def __init__(self, fixed: bool, factory: str) -> None:
        super().__init__()
        self.fixed = fixed
        self.factory = factory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factory == "rand":
            # <- rand_noise: the statement below makes the stray tensor
            noise = torch.rand(x.shape, device=_on(self.fixed, x))
        else:
            # <- randn_noise: the statement below makes the stray tensor
            noise = torch.randn(x.shape, device=_on(self.fixed, x))
        return x + 0.1 * noise


def rand_noise(fixed: bool, held: Held) -> object:
    model = held.audit = Noisy(fixed, "rand").to(DEV)
    return model(torch.randn(2, 8, device=DEV))


def randn_noise(fixed: bool, held: Held) -> object:
    model = held.audit = Noisy(fixed, "randn").to(DEV)
    return model(torch.randn(2, 8, device=DEV))


class Orthogonality(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed
        self.proj = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        # <- eye_penalty: the statement below makes the stray tensor
        identity = torch.eye(8, device=_on(self.fixed, w))
        penalty = ((w @ w.T - identity) ** 2).sum()
        return self.proj(x).sum() + penalty


def eye_penalty(fixed: bool, held: Held) -> object:
    model = held.audit = Orthogonality(fixed).to(DEV)
    return model(torch.randn(2, 8, device=DEV))


class Grid(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- linspace_grid: the statement below makes the stray tensor
        grid = torch.linspace(-1.0, 1.0, x.size(-1), device=_on(self.fixed, x))
        return x * grid


def linspace_grid(fixed: bool, held: Held) -> object:
    model = held.audit = Grid(fixed).to(DEV)
    return model(torch.randn(2, 5, device=DEV))


class Expanded(Positions):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        # <- arange_expand: the statement below makes the stray tensor
        pos = torch.arange(t, device=_on(self.fixed, idx)).unsqueeze(0).expand(b, t)
        return self.tok(idx) + self.pos(pos)


def arange_expand(fixed: bool, held: Held) -> object:
    model = held.audit = Expanded(fixed).to(DEV)
    return model(torch.zeros(2, 5, dtype=torch.long, device=DEV))


class Sampled(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- randint_gather: the statement below makes the stray tensor
        picks = torch.randint(0, x.size(1), (x.size(0), 2), device=_on(self.fixed, x))
        return x.gather(1, picks)


def randint_gather(fixed: bool, held: Held) -> object:
    model = held.audit = Sampled(fixed).to(DEV)
    return model(torch.randn(3, 6, device=DEV))


class CausalCompare(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, att: torch.Tensor) -> torch.Tensor:
        t = att.size(-1)
        # <- arange_compare: the statement below makes the stray tensor
        steps = torch.arange(t, device=_on(self.fixed, att))
        future = steps[None, :] > steps[:, None]
        return att.masked_fill(future, float("-inf")).softmax(-1)


def arange_compare(fixed: bool, held: Held) -> object:
    model = held.audit = CausalCompare(fixed).to(DEV)
    return model(torch.randn(2, 4, 4, device=DEV))


class Padded(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        b, t, _ = x.shape
        # <- ones_padding: the statement below makes the stray tensor
        valid = torch.ones(b, t, dtype=torch.bool, device=_on(self.fixed, x))
        for row, length in enumerate(lengths):
            valid[row, length:] = False
        return x * valid.unsqueeze(-1)


def ones_padding(fixed: bool, held: Held) -> object:
    model = held.audit = Padded(fixed).to(DEV)
    return model(torch.randn(2, 4, 3, device=DEV), [2, 4])


class Offsets(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- as_tensor_numpy: the statement below makes the stray tensor
        offsets = torch.as_tensor(np.arange(x.size(-1)), device=_on(self.fixed, x))
        return x + offsets


def as_tensor_numpy(fixed: bool, held: Held) -> object:
    model = held.audit = Offsets(fixed).to(DEV)
    return model(torch.randn(2, 5, device=DEV))


def causal_mask(t: int, device: torch.device | None) -> torch.Tensor:
    # <- helper_mask: the statement below makes the stray tensor
    return torch.triu(torch.ones(t, t, dtype=torch.bool, device=device), diagonal=1)


class HelperMasked(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, att: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(att.size(-1), _on(self.fixed, att))
        return att.masked_fill(mask, float("-inf")).softmax(-1)


def helper_mask(fixed: bool, held: Held) -> object:
    model = held.audit = HelperMasked(fixed).to(DEV)
    return model(torch.randn(2, 4, 4, device=DEV))


class Prefixed(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- zeros_cat: the statement below makes the stray tensor
        parts = [torch.zeros(x.size(0), 1, device=_on(self.fixed, x))]
        parts.append(x)
        return torch.cat(parts, dim=1)


def zeros_cat(fixed: bool, held: Held) -> object:
    model = held.audit = Prefixed(fixed).to(DEV)
    return model(torch.randn(2, 3, device=DEV))


class Windowed(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # <- hann_window: the statement below makes the stray tensor
        window = torch.hann_window(x.size(-1), device=_on(self.fixed, x))
        return F.normalize(x * window, dim=-1)


def hann_window(fixed: bool, held: Held) -> object:
    model = held.audit = Windowed(fixed).to(DEV)
    return model(torch.randn(2, 8, device=DEV))


_FIX = "device="
CASES = [
    Case(name, "forward-made", program, fix=_FIX, forward=True)
    for name, program in [
        ("arange_positions", arange_positions),
        ("arange_inline", arange_inline),
        ("ones_mask_tril", ones_mask_tril),
        ("zeros_hidden", zeros_hidden),
        ("tensor_from_list", tensor_from_list),
        ("full_bias", full_bias),
        ("empty_accumulator", empty_accumulator),
        ("rand_noise", rand_noise),
        ("randn_noise", randn_noise),
        ("eye_penalty", eye_penalty),
        ("linspace_grid", linspace_grid),
        ("arange_expand", arange_expand),
        ("randint_gather", randint_gather),
        ("arange_compare", arange_compare),
        ("ones_padding", ones_padding),
        ("as_tensor_numpy", as_tensor_numpy),
        ("helper_mask", helper_mask),
        ("zeros_cat", zeros_cat),
        ("hann_window", hann_window),
    ]
]
