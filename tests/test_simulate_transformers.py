"""Tiny Hugging Face models train and generate on a simulated GPU with the CPU's results.

tests/programs/hf_tiny.py builds GPT-2, Llama, BERT and T5 from small configs, takes two AdamW
steps and greedily generates. It runs in a fresh interpreter that imports `transformers` for the
first time *inside* `simulated_devices("cuda", 1)` (model code annotated with `torch.Stream`,
probing `torch.cuda` at import, must load there), once in float32 and once under
`torch.autocast("cuda", dtype=torch.bfloat16)`, then once on the CPU as the reference. With one
thread and autocast off, losses, trained weights and generated ids are bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devicekit._startup import ENVIRONMENT_VARIABLE
from tests.machine import REAL_CUDA

pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(
    REAL_CUDA, reason="these runs simulate CUDA; on a CUDA machine it is real"
)

PROGRAM = Path(__file__).resolve().parent / "programs" / "hf_tiny.py"
ROOT = Path(__file__).resolve().parent.parent
MODELS = ("gpt2", "llama", "bert", "t5")

# Runs the program as `python hf_tiny.py OUT ...` would, three times in one interpreter.
DRIVER = """
import runpy, sys
import torch, devicekit
torch.set_num_threads(1)
program, out = sys.argv[1], sys.argv[2]
if "transformers" in sys.modules:
    raise SystemExit("transformers was imported before the simulation began")
with devicekit.simulated_devices("cuda", 1):
    for name, extra in (("sim", []), ("sim_bf16", ["--autocast", "bfloat16"])):
        sys.argv = [program, f"{out}/{name}", *extra]
        runpy.run_path(program, run_name="__main__")
sys.argv = [program, f"{out}/cpu", "--device", "cpu"]
runpy.run_path(program, run_name="__main__")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The program's results: simulated float32, simulated bfloat16 autocast, and CPU."""
    out = tmp_path_factory.mktemp("hf_tiny")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(ENVIRONMENT_VARIABLE, None)  # the driver starts its own simulation, after startup
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(PROGRAM), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Torch not compiled with CUDA enabled" not in done.stderr
    return {
        name: json.loads((out / name / "result.json").read_text())
        for name in ("sim", "sim_bf16", "cpu")
    }


@pytest.mark.parametrize("model", MODELS)
def test_training_steps_give_the_cpu_losses_and_weights_bit_for_bit(
    runs: dict[str, dict[str, Any]], model: str
) -> None:
    simulated, cpu = runs["sim"][model], runs["cpu"][model]
    assert simulated["losses"] == cpu["losses"]
    assert simulated["checksum"] == cpu["checksum"]
    assert simulated["weights_device"] == "cuda:0"
    assert cpu["weights_device"] == "cpu"
    assert cpu["losses"][1] < cpu["losses"][0]  # the step trained something


@pytest.mark.parametrize("model", ["gpt2", "llama", "t5"])
def test_generate_gives_the_cpu_tokens_on_the_simulated_device(
    runs: dict[str, dict[str, Any]], model: str
) -> None:
    simulated, cpu = runs["sim"][model], runs["cpu"][model]
    assert simulated["generated"] == cpu["generated"]
    assert simulated["generated_device"] == "cuda:0"
    prompt = 4 if model != "t5" else 1  # a decoder-only model echoes its prompt; T5 starts at 0
    assert len(simulated["generated"][0]) == prompt + 5


@pytest.mark.parametrize("model", MODELS)
def test_bfloat16_autocast_trains_within_bfloat16_precision(
    runs: dict[str, dict[str, Any]], model: str
) -> None:
    mixed, cpu = runs["sim_bf16"][model], runs["cpu"][model]
    assert all(math.isfinite(loss) for loss in mixed["losses"])
    assert mixed["losses"] == pytest.approx(cpu["losses"], rel=2e-2)
    assert mixed["losses"] != cpu["losses"]  # the low precision was really used
    assert mixed["weights_device"] == "cuda:0"
