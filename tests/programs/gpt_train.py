"""A tiny GPT training script written for tests/test_simulate_programs.py.

It does what single-GPU language-model training scripts do, with nothing but "cuda" in its code:
token and position embeddings, causal self-attention, an MLP, AdamW, mixed precision with
`torch.autocast` and a `GradScaler`, optionally `torch.compile`, a checkpoint saved and resumed
with `map_location`, then sampling with a seeded `torch.Generator` on the device. Its data is
synthetic (a fixed pseudo-random token stream), so runs are reproducible.

Usage: python gpt_train.py OUT_DIR [--device cuda] [--steps 6] [--dtype float32|float16|bfloat16]
       [--compile off|eager|aot_eager|inductor] [--resume]
It writes OUT_DIR/result.json: the loss of every step, the sampled tokens and where they were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, BLOCK, WIDTH, HEADS, LAYERS, BATCH = 32, 16, 32, 4, 2, 4


class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (batch, length, HEADS, width // HEADS)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.attention = CausalSelfAttention()
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(BLOCK, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.tokens.weight  # tied, as GPT-2 does
        for embedding in (self.tokens, self.positions):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.tokens(idx) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        for _ in range(count):
            logits, _ = self(idx[:, -BLOCK:])
            probs = F.softmax(logits[:, -1, :].float(), dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of the synthetic corpus (on the CPU, the same for every device)."""
    generator = torch.Generator().manual_seed(1000 + step)
    chunk = torch.randint(VOCAB, (BATCH, BLOCK + 1), generator=generator)
    return chunk[:, :-1], chunk[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile", default="off")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    checkpoint_path = args.out_dir / "ckpt.pt"

    torch.manual_seed(1337)
    model = TinyGPT().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = 0
    if args.resume:
        checkpoint = torch.load(checkpoint_path, map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start = checkpoint["step"]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise SystemExit("this GPU has no bfloat16")
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    step_model = model if args.compile == "off" else torch.compile(model, backend=args.compile)

    losses = []
    for step in range(start, start + args.steps):
        x, y = batches(step)
        if device.type == "cuda":  # as GPU scripts do: pinned host memory, asynchronous copy
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device)
        else:
            x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = step_model(x, y)
        assert loss is not None
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"step {step}: loss is {losses[-1]}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save({**state, "step": start + args.steps}, checkpoint_path)

    model.eval()
    generator = torch.Generator(device=device).manual_seed(42)
    start_tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
    with autocast:
        sample = model.generate(start_tokens, 8, generator)
    result = {
        "losses": losses,
        "sample": sample[0].tolist(),
        "sample_device": str(sample.device),
        "parameter_device": str(next(model.parameters()).device),
        "loss_dtype": str(loss.dtype),
    }
    (args.out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
