"""Tensors a module holds where `Module.to` does not look: plain attributes, lists, dicts,
tuples, and modules kept in a plain list."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests.bug_corpus import Case, Held

DEV = "cuda:0"


class Attention(nn.Module):
    def __init__(self, fixed: bool, n: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        # <- plain_attr_mask: the statement below makes the stray tensor
        mask = torch.tril(torch.ones(n, n))
        if fixed:
            self.register_buffer("mask", mask, persistent=False)
        else:
            self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = q @ k.transpose(1, 2) / math.sqrt(8)
        att = att.masked_fill(self.mask[:t, :t] == 0, float("-inf"))
        return att.softmax(-1) @ v


class Block(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.attn = Attention(fixed)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class MiniGPT(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(fixed) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def plain_attr_mask(fixed: bool, held: Held) -> object:
    model = held.audit = MiniGPT(fixed).to(DEV)
    return model(torch.randn(2, 4, 8, device=DEV))


class PositionalEncoding(nn.Module):
    def __init__(self, fixed: bool, d: int = 8, n: int = 16) -> None:
        super().__init__()
        position = torch.arange(n).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        # <- plain_attr_pe: the statement below makes the stray tensor
        pe = torch.zeros(n, d)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        if fixed:
            self.register_buffer("pe", pe)
        else:
            self.pe = pe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.size(1)]


class Encoder(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.pos_encoder = PositionalEncoding(fixed)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pos_encoder(self.embed(idx))


def plain_attr_pe(fixed: bool, held: Held) -> object:
    model = held.audit = Encoder(fixed).to(DEV)
    return model(torch.zeros(2, 5, dtype=torch.long, device=DEV))


class MultiScale(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        # <- list_of_masks: the statement below makes the stray tensor
        masks = [torch.ones(8) * scale for scale in (1.0, 0.5)]
        if fixed:
            for index, mask in enumerate(masks):
                self.register_buffer(f"mask_{index}", mask, persistent=False)
            self.masks = [f"mask_{index}" for index in range(len(masks))]
        else:
            self.masks = masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mask in self.masks:
            x = x * (getattr(self, mask) if isinstance(mask, str) else mask)
        return x


def list_of_masks(fixed: bool, held: Held) -> object:
    model = held.audit = MultiScale(fixed).to(DEV)
    return model(torch.randn(2, 8, device=DEV))


class Tables(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        # <- dict_of_tensors: the statement below makes the stray tensor
        scale = torch.full((8,), 2.0)
        if fixed:
            self.register_buffer("scale", scale)
        else:
            self.tables = {"scale": scale}
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.fixed else self.tables["scale"]
        return x * scale


def dict_of_tensors(fixed: bool, held: Held) -> object:
    model = held.audit = Tables(fixed).to(DEV)
    return model(torch.randn(2, 8, device=DEV))


class Anchors(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        # <- tuple_anchors: the statement below makes the stray tensor
        sizes, ratios = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
        if fixed:
            self.register_buffer("sizes", sizes)
            self.register_buffer("ratios", ratios)
            self.anchors = ("sizes", "ratios")
        else:
            self.anchors = (sizes, ratios)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes, ratios = (getattr(self, a) if isinstance(a, str) else a for a in self.anchors)
        return x[:, :2] * sizes + ratios


def tuple_anchors(fixed: bool, held: Held) -> object:
    model = held.audit = Anchors(fixed).to(DEV)
    return model(torch.randn(3, 4, device=DEV))


class Classifier(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        # <- class_weights_attr: the statement below makes the stray tensor
        weights = torch.tensor([1.0, 5.0, 2.0])
        if fixed:
            self.register_buffer("class_weights", weights)
        else:
            self.class_weights = weights

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(x), labels, weight=self.class_weights)


def class_weights_attr(fixed: bool, held: Held) -> object:
    model = held.audit = Classifier(fixed).to(DEV)
    x, labels = torch.randn(4, 8, device=DEV), torch.tensor([0, 1, 2, 1], device=DEV)
    return model.loss(x, labels)


class MultiHead(nn.Module):
    def __init__(self, fixed: bool) -> None:
        super().__init__()
        heads = [nn.Linear(8, 2), nn.Linear(8, 2)]
        self.heads = nn.ModuleList(heads) if fixed else heads

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(x) for head in self.heads]


def modules_in_list(fixed: bool, held: Held) -> object:
    model = held.audit = MultiHead(fixed).to(DEV)
    return model(torch.randn(2, 8, device=DEV))


CASES = [
    Case(
        "plain_attr_mask",
        "plain attribute",
        plain_attr_mask,
        fix='register_buffer("mask"',
        owner="model.blocks[0].attn.mask",
        held=True,
    ),
    Case(
        "plain_attr_pe",
        "plain attribute",
        plain_attr_pe,
        fix='register_buffer("pe"',
        owner="model.pos_encoder.pe",
        held=True,
    ),
    Case(
        "list_of_masks",
        "tensor in a list",
        list_of_masks,
        fix="register each tensor of masks as a buffer",
        owner="model.masks[0]",
        held=True,
    ),
    Case(
        "dict_of_tensors",
        "tensor in a dict",
        dict_of_tensors,
        fix="register each tensor of tables as a buffer",
        owner="model.tables['scale']",
        held=True,
    ),
    Case(
        "tuple_anchors",
        "tensor in a tuple",
        tuple_anchors,
        fix="register each tensor of anchors as a buffer",
        owner="model.anchors[0]",
        held=True,
    ),
    Case(
        "class_weights_attr",
        "class weights as a plain attribute",
        class_weights_attr,
        fix='register_buffer("class_weights"',
        owner="model.class_weights",
        held=True,
    ),
    Case(
        "modules_in_list",
        "modules in a plain list",
        modules_in_list,
        fix="nn.ModuleList",
        owner="model.heads[0].weight",
        held=True,
    ),
]
