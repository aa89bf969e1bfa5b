"""What running under `simulated_devices` costs: the same code on `cpu` and on simulated `cuda:0`.

Run: `python -m benchmarks.bench_simulate [--rounds N]`.

A second table times single ops on 4-element tensors three ways: plain, inside the simulation
on ordinary CPU tensors (what every op of a CPU test costs under `--devicekit-simulate`), and
on tensors on the simulated device.

Each case is timed on plain CPU tensors with no simulation, and on the same tensors moved to a
simulated `cuda:0` inside `simulated_devices("cuda", 1)`, interleaved round after round. Like the
guard benchmark it times the CPU time of this process (`time.process_time`, torch on one thread),
which busy neighbours on the shared 2-core machines do not inflate; figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence

import torch

import devicekit
from benchmarks._timing import format_table, median_cpu_us

#: The transformer of the minGPT-size case: layers, width, heads, tokens in the vocabulary,
#: sequences per batch, tokens per sequence (the tests shrink it).
GPT_SIZE = {"layers": 4, "width": 128, "heads": 4, "vocab": 256, "batch": 8, "tokens": 64}


def cases(device: str) -> dict[str, Callable[[], object]]:
    """The timed calls, with every tensor and module on `device`."""
    a, b = torch.ones(4, device=device), torch.ones(4, device=device)
    linear, x = torch.nn.Linear(64, 32).to(device), torch.ones(8, 64, device=device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = torch.randn(16, 32, device=device), torch.randn(16, 1, device=device)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()

    return {
        "torch.add(a, b), 4 elements": lambda: torch.add(a, b),
        "a + b, 4 elements": lambda: a + b,
        "nn.Linear(64, 32) forward, batch 8": lambda: linear(x),
        "SGD training step, 2-layer MLP": step,
        "minGPT-size training step": gpt_step(device),
    }


def gpt_step(device: str) -> Callable[[], None]:
    """One AdamW training step of a small GPT-like transformer on `device` (`GPT_SIZE`: by
    default 4 layers of width 128 with dropout 0.1, batches of 8 sequences of 64 tokens)."""
    size = GPT_SIZE
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        size["width"], size["heads"], 4 * size["width"], dropout=0.1, batch_first=True
    )
    model = torch.nn.Sequential(
        torch.nn.Embedding(size["vocab"], size["width"]),
        torch.nn.TransformerEncoder(layer, size["layers"], enable_nested_tensor=False),
        torch.nn.Linear(size["width"], size["vocab"]),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["tokens"]), device=device)

    def step() -> None:
        optimizer.zero_grad()
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()

    return step


def per_op_cases(device: str) -> dict[str, Callable[[], object]]:
    """Single ops on 4-element tensors made on `device` (the per-op table)."""
    a, b = torch.ones(4, device=device), torch.ones(4, device=device)
    return {
        "torch.add(a, b)": lambda: torch.add(a, b),
        "a + b": lambda: a + b,
        "a.sum()": lambda: a.sum(),
        "torch.cat([a, b])": lambda: torch.cat([a, b]),
        "a.to(torch.float64)": lambda: a.to(torch.float64),
        "a.device": lambda: a.device,
        "torch.zeros(4)": lambda: torch.zeros(4),
    }


def per_op_table(rounds: int) -> str:
    """Median ns per op: plain, inside a simulation on ordinary CPU tensors (what the CPU tests
    of a run-wide simulation pay), and on tensors on the simulated `cuda:0`."""
    plain = per_op_cases("cpu")
    simulation = devicekit.simulated_devices("cuda", 1)
    with simulation:
        tagged = per_op_cases("cuda:0")
        tagged["torch.zeros(4)"] = lambda: torch.zeros(4, device="cuda:0")
    samples: dict[str, tuple[list[float], list[float], list[float]]] = {
        name: ([], [], []) for name in plain
    }
    for _ in range(rounds):
        for name in plain:
            samples[name][0].append(median_cpu_us(plain[name], repeat=3) * 1000)
            with simulation:
                samples[name][1].append(median_cpu_us(plain[name], repeat=3) * 1000)
                samples[name][2].append(median_cpu_us(tagged[name], repeat=3) * 1000)
    rows = []
    for name, (cpu, untagged, simulated) in samples.items():
        cpu_ns, untagged_ns, simulated_ns = map(statistics.median, (cpu, untagged, simulated))
        rows.append(
            [
                name,
                cpu_ns,
                untagged_ns,
                f"{untagged_ns / cpu_ns:.2f}x",
                simulated_ns,
                f"{simulated_ns / cpu_ns:.2f}x",
            ]
        )
    headers = ["op", "plain ns", "in simulation, cpu ns", "ratio", "on cuda:0 ns", "ratio"]
    return format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)
    plain = cases("cpu")
    simulation = devicekit.simulated_devices("cuda", 1)
    with simulation:
        simulated = cases("cuda:0")
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in plain}
    for _ in range(arguments.rounds):
        for name in plain:
            samples[name][0].append(median_cpu_us(plain[name], repeat=3))
            with simulation:
                samples[name][1].append(median_cpu_us(simulated[name], repeat=3))
    rows = []
    for name, (cpu, sim) in samples.items():
        cpu_us, sim_us = statistics.median(cpu), statistics.median(sim)
        rows.append([name, cpu_us, sim_us, sim_us - cpu_us, f"{sim_us / cpu_us:.2f}x"])
    print(
        f"torch {torch.__version__}, 1 CPU thread, medians of process CPU time in us\n"
        + format_table(["op", "cpu", "simulated cuda:0", "added", "ratio"], rows)
    )
    print(
        "\nPer op, in ns: plain; inside simulated_devices on ordinary CPU tensors (the CPU "
        "tests of a run-wide simulation); on simulated cuda:0\n" + per_op_table(arguments.rounds)
    )


if __name__ == "__main__":
    main()
