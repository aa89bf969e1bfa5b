"""Building on `meta` and materialising: devicekit against the usual recipes, on ten models.

    python -m benchmarks.bench_materialize                 # cpu and a simulated cuda:0
    python -m benchmarks.bench_materialize --memory        # and peak memory, one process each
    python -m benchmarks.bench_materialize --timing        # build times of GPT-2s, CPU

For each model and target device, each method builds the model without memory and gives it
memory on the device; the result is compared with eager construction on that device after the
same `torch.manual_seed`:

- **devicekit**: `with devicekit.deferred(): build()`, then `devicekit.materialize(model, d)`.
- **to_empty+reset**: built under `with torch.device("meta")`, then `model.to_empty(device=d)`
  and `reset_parameters()` (or `_reset_parameters()`) on every module that has one, children
  first.
- **accelerate**: built under accelerate's `init_empty_weights()`, each meta parameter given
  memory with `set_module_tensor_to_device`, `reset_parameters()` as above, and the ties put
  back with `tie_weights()` (Hugging Face models) or `retie_parameters` of the ties
  `find_tied_parameters` found before.

A cell reads `ties/values`: `ties` when the parameters and buffers are shared exactly as in the
eager model (the same names name one object), `values` when every parameter and buffer (the
non-persistent ones too) is bit-identical to the eager model's. With `--memory`, each build and
materialisation also runs in a child process on the CPU, and the table gives its peak resident
memory above the child's memory before building (`VmHWM` after resetting it), in MiB.

With `--timing`, the table is instead how long GPT-2s built from configs (`TIMED_MODELS`) take
on one CPU thread: eager construction against `deferred()` recording plus `materialize`
replaying, each the median of `--repeat` runs (each seeded alike).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import devicekit

Build = Callable[[], nn.Module]

METHODS = ("devicekit", "to_empty+reset", "accelerate")


# --- the ten models -------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """A language model whose head shares the embedding's weight."""

    def __init__(self, vocab: int = 64, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))  # type: ignore[no-any-return]


class ConvNet(nn.Module):
    """A conv net whose parent applies its own `_init_weights` after the children's own init."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)
        )
        self.classifier = nn.Linear(8, 4)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)


class Rotary(nn.Module):
    """A module whose buffers are computed in `__init__` (rotary frequencies and a causal mask)."""

    def __init__(self, dim: int = 16, length: int = 8, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        positions = torch.arange(length).float()
        self.register_buffer("angles", torch.outer(positions, inv_freq))
        self.register_buffer("mask", torch.ones(length, length, dtype=torch.bool).tril())
        self.proj = nn.Linear(dim, dim)


def _norm_stack() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.LayerNorm(16),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16, affine=False),
        nn.LayerNorm(16, elementwise_affine=True, bias=False),
    )


def _weight_norm() -> nn.Module:
    return nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(8, 16)),
        nn.ReLU(),
        nn.utils.parametrizations.weight_norm(nn.Linear(16, 4), dim=None),  # type: ignore[arg-type]
    )


def _gpt2_sized(
    width: int, layers: int, heads: int, vocab: int, positions: int = 1024
) -> Callable[[], nn.Module]:
    """A builder of a GPT-2 from a config of these sizes."""

    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            vocab_size=vocab,
            n_positions=positions,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config)

    return build


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _transformer() -> nn.Module:
    return nn.Transformer(
        d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32
    )


#: The ten models, by the name the table shows.
MODELS: dict[str, Build] = {
    "LM with a tied head": TiedLM,
    "HF GPT-2 (tiny, from config)": _gpt2_sized(32, 2, 2, 128, positions=32),
    "HF Llama (tiny, rotary, tied)": _llama,
    "nn.Transformer": _transformer,
    "nn.MultiheadAttention": lambda: nn.MultiheadAttention(16, 2, kdim=8, vdim=8),
    "weight_norm parametrisation": _weight_norm,
    "BatchNorm/LayerNorm stack": _norm_stack,
    "EmbeddingBag": lambda: nn.EmbeddingBag(32, 8, mode="mean", padding_idx=0),
    "conv net, parent _init_weights": ConvNet,
    "buffers computed in __init__": Rotary,
}


class BigLM(nn.Module):
    """The model of the memory check: a tied 16 MiB embedding and 24 MiB of linear layers."""

    def __init__(self, vocab: int = 8192, width: int = 512, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(width, 4 * width), nn.Linear(4 * width, width))
                for _ in range(layers)
            )
        )
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


#: Models measured for memory only (`--memory`), by name.
BIG_MODELS: dict[str, Build] = {
    "tied LM, 40 MiB": BigLM,
    "10 x Linear(1024, 1024), 40 MiB": lambda: nn.Sequential(
        *(nn.Linear(1024, 1024) for _ in range(10))
    ),
}


# --- building and comparing -----------------------------------------------------------------------


def eager(build: Build, device: torch.device, seed: int) -> nn.Module:
    """`build()` run on `device` (as the default device) after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    if device.type == "cpu":
        return build()
    with devicekit.default_device(device):
        return build()


def _reset_all(model: nn.Module) -> None:
    from devicekit._materialize import _post_order, reset_function

    for _, module in _post_order(model):
        reset = reset_function(module)
        if reset is not None:
            with torch.no_grad():
                reset()


def with_devicekit(build: Build, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with devicekit.deferred(device):
        model = build()
    return devicekit.materialize(model, device)


def with_to_empty(build: Build, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = build()
    model.to_empty(device=device)
    _reset_all(model)
    return model


def with_accelerate(build: Build, device: torch.device, seed: int) -> nn.Module:
    from accelerate import init_empty_weights
    from accelerate.utils import (
        find_tied_parameters,
        retie_parameters,
        set_module_tensor_to_device,
    )

    torch.manual_seed(seed)
    with init_empty_weights():
        model = build()
    tied = find_tied_parameters(model)
    for name, parameter in list(model.named_parameters()):
        if parameter.is_meta:
            value = torch.empty(parameter.shape, dtype=parameter.dtype, device=device)
            set_module_tensor_to_device(model, name, device, value=value)
    model.to(device)
    _reset_all(model)
    tie_weights: Any = getattr(model, "tie_weights", None)
    if callable(tie_weights):
        tie_weights()
    else:
        retie_parameters(model, tied)
    return model


RUNNERS: dict[str, Callable[[Build, torch.device, int], nn.Module]] = {
    "devicekit": with_devicekit,
    "to_empty+reset": with_to_empty,
    "accelerate": with_accelerate,
}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _distinct_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of `model`, each tensor once (a tied one is counted once)."""
    return list({id(t): t for t in _tensors(model).values()}.values())


def sharing(model: nn.Module) -> list[list[str]]:
    """The names of the parameters and buffers, grouped by the object they name."""
    groups: dict[int, list[str]] = {}
    for name, tensor in _tensors(model).items():
        groups.setdefault(id(tensor), []).append(name)
    return sorted(groups.values())


def compare(reference: nn.Module, model: nn.Module) -> tuple[bool, bool]:
    """(ties as in `reference`, every parameter and buffer bit-identical to `reference`'s)."""
    ties = sharing(model) == sharing(reference)
    expected, found = _tensors(reference), _tensors(model)
    state, reference_state = model.state_dict(), reference.state_dict()
    values = (
        expected.keys() == found.keys()
        and state.keys() == reference_state.keys()
        and all(_identical(expected[name], found[name]) for name in expected)
        and all(_identical(reference_state[name], state[name]) for name in state)
    )
    return ties, values


def _identical(expected: torch.Tensor, found: torch.Tensor) -> bool:
    return (
        expected.device == found.device
        and expected.dtype == found.dtype
        and expected.shape == found.shape
        and bool(torch.equal(expected, found))
    )


@contextlib.contextmanager
def _target(device: str) -> Iterator[torch.device]:
    """The device to build on: `cpu`, or `cuda:0` simulated on the CPU."""
    if device == "cpu":
        yield torch.device("cpu")
        return
    with devicekit.simulated_devices("cuda", 1):
        yield torch.device("cuda:0")


def results(
    devices: Sequence[str] = ("cpu", "cuda"),
    methods: Sequence[str] = METHODS,
    models: Mapping[str, Build] | None = None,
    seed: int = 0,
) -> dict[tuple[str, str, str], tuple[bool, bool] | str]:
    """`(model, device, method) -> (ties kept, values identical)`, or the error's name."""
    found: dict[tuple[str, str, str], tuple[bool, bool] | str] = {}
    for device_name in devices:
        with _target(device_name) as device, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, build in (MODELS if models is None else models).items():
                reference = eager(build, device, seed)
                for method in methods:
                    try:
                        model = RUNNERS[method](build, device, seed)
                    except Exception as error:  # a peer failing is a result, not a crash
                        found[name, device_name, method] = type(error).__name__
                    else:
                        found[name, device_name, method] = compare(reference, model)
    return found


def _cell(result: tuple[bool, bool] | str) -> str:
    if isinstance(result, str):
        return f"fails ({result})"
    ties, values = result
    return f"{'ties' if ties else 'UNTIED'} / {'identical' if values else 'DIFFERENT'}"


def count(
    found: dict[tuple[str, str, str], tuple[bool, bool] | str], device: str, method: str
) -> int:
    """How many models `method` got right on `device`: ties kept and values identical."""
    return sum(
        result == (True, True)
        for (_, where, how), result in found.items()
        if where == device and how == method
    )


# --- peak memory ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    """A size in KiB from `/proc/self/status`: `VmHWM` (the peak) or `VmRSS` (the current)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")  # pragma: no cover


def _reset_peak() -> None:
    """Make `VmHWM` start again from the current resident size (Linux `clear_refs` 5)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def measure_child(model: str, method: str) -> None:
    """In this (child) process: the peak memory of one build and materialisation, as JSON."""
    build = {**MODELS, **BIG_MODELS}[model]
    device = torch.device("cpu")
    runner = eager if method == "eager" else RUNNERS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # warm up: imports, lazily built tables, without memory
            build()
        runner(TiedLM, device, 0)
        _reset_peak()
        before = _status_kib("VmRSS")
        built = runner(build, device, 0)
        peak = _status_kib("VmHWM")
    nbytes = sum(t.nbytes for t in _distinct_tensors(built))
    print(json.dumps({"peak_mib": (peak - before) / 1024, "model_mib": nbytes / 2**20}))


def peak_memory(model: str, method: str) -> dict[str, float]:
    """Run `measure_child` in a fresh interpreter; `{"peak_mib": ..., "model_mib": ...}`."""
    command = [sys.executable, "-m", "benchmarks.bench_materialize", "--child", model, method]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run(
        command, capture_output=True, text=True, check=True, cwd=root, timeout=600
    ).stdout
    value: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return value


# --- the table ------------------------------------------------------------------------------------


def table(
    found: dict[tuple[str, str, str], tuple[bool, bool] | str],
    devices: Sequence[str],
    methods: Sequence[str],
    memory: dict[tuple[str, str], dict[str, float]] | None = None,
) -> str:
    """The markdown table: a row per model, a column per device and method."""
    names = list(dict.fromkeys(name for name, _, _ in found))
    header = ["model"] + [f"{method} ({device})" for device in devices for method in methods]
    if memory:
        header += ["eager MiB"] + [f"{method} MiB" for method in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name] + [_cell(found[name, d, m]) for d in devices for m in methods]
        if memory:
            cells += [f"{memory[name, how]['peak_mib']:.1f}" for how in ("eager", *methods)]
        lines.append("| " + " | ".join(cells) + " |")
    totals = ["**right (ties and values)**"] + [
        f"**{count(found, d, m)}/{len(names)}**" for d in devices for m in methods
    ]
    if memory:
        totals += [""] * (1 + len(methods))
    lines.append("| " + " | ".join(totals) + " |")
    return "\n".join(lines)


def memory_table(methods: Sequence[str] = METHODS) -> str:
    """Peak memory of building and materialising `BIG_MODELS` on the CPU, a child process each."""
    lines = [
        "| model | model MiB | largest tensor MiB | "
        + " | ".join(f"{how} peak MiB" for how in ("eager", *methods))
        + " |",
        "|" + "---|" * (3 + 1 + len(methods)),
    ]
    for name, build in BIG_MODELS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                shapes = build()
        tensors = _distinct_tensors(shapes)
        total = sum(t.nbytes for t in tensors) / 2**20
        largest = max(t.nbytes for t in tensors) / 2**20
        peaks = [peak_memory(name, how)["peak_mib"] for how in ("eager", *methods)]
        cells = [name, f"{total:.1f}", f"{largest:.1f}", *(f"{peak:.1f}" for peak in peaks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The models `--timing` times: GPT-2s from configs, tiny to small.
TIMED_MODELS: dict[str, Callable[[], nn.Module]] = {
    "GPT-2 2 layers, width 128": _gpt2_sized(128, 2, 2, 8000),
    "GPT-2 6 layers, width 512": _gpt2_sized(512, 6, 8, 32000),
}


def timing(models: dict[str, Callable[[], nn.Module]] | None = None, repeats: int = 5) -> str:
    """Seconds to build each model eagerly, to record it under `deferred()`, and to
    `materialize` it on the CPU: a markdown table of medians over `repeats` runs."""
    lines = [
        "| model | parameters | eager s | record s | materialise s | record + materialise s |",
        "|---|---|---|---|---|---|",
    ]
    for name, build in (TIMED_MODELS if models is None else models).items():
        eager_s, record_s, replay_s = [], [], []
        parameters = 0
        for _ in range(repeats):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                start = time.perf_counter()
                model = build()
                eager_s.append(time.perf_counter() - start)
                parameters = sum(p.numel() for p in model.parameters())
                del model
                torch.manual_seed(0)
                start = time.perf_counter()
                with devicekit.deferred("cpu"):
                    model = build()
                record_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                devicekit.materialize(model, "cpu")
                replay_s.append(time.perf_counter() - start)
                del model
        eager, record, replay = (statistics.median(v) for v in (eager_s, record_s, replay_s))
        lines.append(
            f"| {name} | {parameters / 1e6:.1f}M | {eager:.3f} | {record:.3f} | {replay:.3f} "
            f"| {record + replay:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--memory", action="store_true", help="peak memory, a child each")
    parser.add_argument("--timing", action="store_true", help="build times of GPT-2s, CPU")
    parser.add_argument("--repeat", type=int, default=5, help="runs per --timing median")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child:
        measure_child(*arguments.child)
        return ""
    torch.set_num_threads(1)
    if arguments.timing:
        text = timing(repeats=arguments.repeat)
        print(text)
        return text
    found = results(arguments.device, arguments.method)
    memory = None
    if arguments.memory:
        memory = {
            (name, how): peak_memory(name, how)
            for name in MODELS
            for how in ("eager", *arguments.method)
        }
    text = table(found, arguments.device, arguments.method, memory)
    if arguments.memory:
        text += "\n\n" + memory_table(arguments.method)
    print(text)
    return text


if __name__ == "__main__":
    main()
