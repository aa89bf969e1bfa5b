"""Tiny Hugging Face models trained and sampled, written for tests/test_simulate_transformers.py.

It does what a fine-tuning script does with `transformers`, with nothing but the device name in
its code: build GPT-2, Llama, BERT and T5 from small configs (2 layers, width 32, vocabulary 100,
no dropout), initialise them on the CPU from one seed, move them to the device, take two AdamW
steps, then greedy `generate` five new tokens (BERT, a masked-language model, only trains).
Inputs are drawn on the CPU from a seeded generator and moved, so every device sees the same data.

Usage: python hf_tiny.py OUT_DIR [--device cuda] [--autocast off|bfloat16|float16]
It writes OUT_DIR/result.json: per model, the loss of each step, a checksum of the trained
weights, the generated ids, and where the weights and the generated ids were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB, WIDTH, LAYERS, HEADS, BATCH, LENGTH = 100, 32, 2, 2, 2, 8


def build(name: str) -> torch.nn.Module:
    """A tiny model of the family `name`, without dropout, initialised from seed 0 on the CPU."""
    configs: dict[str, Any] = {
        "gpt2": lambda: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=WIDTH,
                n_layer=LAYERS,
                n_head=HEADS,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=1,
                eos_token_id=1,
            )
        ),
        "llama": lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=WIDTH,
                intermediate_size=64,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                num_key_value_heads=HEADS,
                max_position_embeddings=64,
            )
        ),
        "bert": lambda: BertForMaskedLM(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=WIDTH,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=64,
                max_position_embeddings=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        ),
        "t5": lambda: T5ForConditionalGeneration(
            T5Config(
                vocab_size=VOCAB,
                d_model=WIDTH,
                d_kv=16,
                d_ff=64,
                num_layers=LAYERS,
                num_decoder_layers=LAYERS,
                num_heads=HEADS,
                dropout_rate=0.0,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        ),
    }
    torch.manual_seed(0)
    model: torch.nn.Module = configs[name]()
    return model


def batch(name: str, device: str) -> dict[str, torch.Tensor]:
    """A batch of random tokens, drawn on the CPU from a fixed seed and moved to `device`."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (BATCH, LENGTH), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "t5":
        inputs["labels"] = torch.randint(2, VOCAB, (BATCH, LENGTH), generator=generator)
    else:
        inputs["labels"] = ids.clone()
    return {key: value.to(device) for key, value in inputs.items()}


def run(name: str, device: str, autocast: str) -> dict[str, Any]:
    model = build(name).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = batch(name, device)
    precision = (
        torch.autocast(device, dtype=getattr(torch, autocast))
        if autocast != "off"
        else contextlib.nullcontext()
    )
    losses = []
    for _ in range(2):
        with precision:
            loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weights = next(model.parameters())
    result: dict[str, Any] = {
        "losses": losses,
        "checksum": sum(float(p.detach().double().sum()) for p in model.parameters()),
        "weights_device": str(weights.device),
    }
    if name != "bert":
        model.eval()
        prompt = inputs["input_ids"][:, :4]
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
            )
        result["generated"] = out.tolist()
        result["generated_device"] = str(out.device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--autocast", default="off")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    results = {
        name: run(name, options.device, options.autocast)
        for name in ("gpt2", "llama", "bert", "t5")
    }
    (options.out / "result.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
