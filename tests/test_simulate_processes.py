"""Child processes inherit a simulation: `DEVICEKIT_SIMULATE` and the start-up hook.

Real processes are started here (subprocess, multiprocessing pools, `torch.multiprocessing`,
DataLoader workers, queues); the programs they run are in tests/programs/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devicekit import simulated_devices
from devicekit._errors import SimulationError
from devicekit._startup import (
    ENVIRONMENT_VARIABLE,
    PTH_NAME,
    _parse,
    _rebuild_simulated,
    hook_installed,
)
from tests.machine import REAL_CUDA

pytest_plugins = ["pytester"]

PROGRAMS = Path(__file__).resolve().parent / "programs"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    REAL_CUDA, reason="these runs simulate CUDA; on a CUDA machine it is real"
)


@pytest.fixture(scope="module", autouse=True)
def _hook_installed() -> None:
    if not hook_installed():
        pytest.fail(
            f"{PTH_NAME} is not in this interpreter's site-packages, so child processes cannot "
            "inherit a simulation. Reinstall devicekit (`pip install -e .`; `make test` does it "
            "whenever pyproject.toml changes)."
        )


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _python(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=_environment(), capture_output=True, text=True, timeout=timeout
    )


def test_the_hook_is_one_line_that_only_reads_the_variable() -> None:
    (line,) = (ROOT / "devicekit" / "_startup.pth").read_text(encoding="utf-8").splitlines()
    assert line.startswith('import os; os.environ.get("DEVICEKIT_SIMULATE") and ')


def test_without_the_variable_the_hook_imports_nothing() -> None:
    env = _environment()
    env.pop(ENVIRONMENT_VARIABLE, None)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; print(sorted(m for m in sys.modules if 'devicekit' in m))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_the_hook_module_imports_no_torch_and_changes_no_variable() -> None:
    code = (
        "import os, sys; before = dict(os.environ); import devicekit._startup; "
        "print('torch' in sys.modules, dict(os.environ) == before)"
    )
    done = _python("-c", code)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_a_script_run_from_inside_a_simulation_is_simulated() -> None:
    code = (
        "import torch; x = torch.ones(2, device='cuda:1') * 2; "
        "print(torch.cuda.device_count(), x.device, x.is_cuda)"
    )
    with simulated_devices("cuda", 2):
        done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "cuda:1", "True"]


def test_a_child_that_imports_torch_through_devicekit_is_simulated() -> None:
    # devicekit's lazy names import torch first, so entering the inherited simulation (as
    # torch is imported) never meets a devicekit module that is half imported.
    code = "import devicekit; print(devicekit.devices()[-1].simulated, devicekit.best_device())"
    with simulated_devices("cuda", 2):
        done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "cuda:0"]


def test_a_child_started_outside_a_simulation_is_not_simulated() -> None:
    with simulated_devices("cuda", 2):
        pass
    done = _python(
        "-c",
        "import torch, os; print(torch.cuda.is_available(), 'DEVICEKIT_SIMULATE' in os.environ)",
    )
    assert done.stdout.split() == ["False", "False"]


def test_children_of_every_kind_are_simulated(tmp_path: Path) -> None:
    out = tmp_path / "children.json"
    with simulated_devices("cuda", 2):
        done = _python(str(PROGRAMS / "children.py"), str(out))
    assert done.returncode == 0, done.stderr
    found = json.loads(out.read_text(encoding="utf-8"))
    assert found["parent"] == ["cuda:2", 2, "cuda:1"]
    for kind in ("pool", "torch.multiprocessing.spawn"):
        assert found[kind] == [["cuda:2", 2, "cuda:0"], ["cuda:2", 2, "cuda:1"]], kind
    for start in ("fork", "spawn"):
        assert found[f"dataloader {start}"] == [["cuda:1", [2, 2]], ["cuda:1", [2, 2]]], start
    assert found["queue"] == ["cuda:1", [1.0, 2.0, 3.0]]


def test_hogwild_trainers_share_a_simulated_model_with_the_cpu_result(tmp_path: Path) -> None:
    cpu = _python(str(PROGRAMS / "hogwild.py"), "cpu", str(tmp_path / "cpu.json"))
    assert cpu.returncode == 0, cpu.stderr
    with simulated_devices("cuda", 2):
        cuda = _python(str(PROGRAMS / "hogwild.py"), "cuda", str(tmp_path / "cuda.json"))
    assert cuda.returncode == 0, cuda.stderr
    on_cpu = json.loads((tmp_path / "cpu.json").read_text(encoding="utf-8"))
    on_cuda = json.loads((tmp_path / "cuda.json").read_text(encoding="utf-8"))
    assert [device for _, device, _ in on_cuda["trainers"]] == ["cuda:0", "cuda:0"]
    assert on_cuda["prediction_device"] == "cuda:0"
    assert on_cuda["weight"] == on_cpu["weight"]
    assert on_cuda["bias"] == on_cpu["bias"]
    assert [loss for *_, loss in on_cuda["trainers"]] == [loss for *_, loss in on_cpu["trainers"]]


def test_a_child_that_cannot_be_simulated_fails_loudly() -> None:
    env = _environment()
    env[ENVIRONMENT_VARIABLE] = "cuda:lots"
    done = subprocess.run(
        [sys.executable, "-c", "import torch; print('ran')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0
    assert "ran" not in done.stdout
    assert "SimulationError: DEVICEKIT_SIMULATE='cuda:lots': this process" in done.stderr
    assert "expected TYPE:COUNT, such as cuda:2" in done.stderr


def test_a_child_asked_for_an_unsupported_type_fails_loudly() -> None:
    env = _environment()
    env[ENVIRONMENT_VARIABLE] = "tpu:2"
    done = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode != 0
    assert "SimulationError: DEVICEKIT_SIMULATE='tpu:2'" in done.stderr
    assert "cannot simulate 'tpu'" in done.stderr


def test_a_child_that_never_imports_torch_pays_nothing_for_it() -> None:
    with simulated_devices("cuda", 2):
        done = _python("-c", "import sys; print('torch' in sys.modules)")
    assert done.stdout.strip() == "False"


def test_a_simulated_tensor_sent_to_a_process_without_the_simulation_is_refused() -> None:
    with pytest.raises(SimulationError, match=r"was sent to process \d+, which does not simulate"):
        _rebuild_simulated("cuda:1", torch.zeros, (2,))
    with simulated_devices("cuda", 1), pytest.raises(SimulationError, match="cuda:1"):
        _rebuild_simulated("cuda:1", torch.zeros, (2,))


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("cuda:2", ("cuda", 2, {})),
        ("xpu", ("xpu", 2, {})),
        (
            "cuda:1;memory=1024;capability=8.6;name=My GPU; v2",
            ("cuda", 1, {"memory": 1024, "capability": (8, 6), "name": "My GPU; v2"}),
        ),
    ],
)
def test_the_variable_is_parsed(value: str, parsed: tuple[str, int, dict[str, object]]) -> None:
    assert _parse(value) == parsed


def test_the_variable_carries_the_device_facts_to_children() -> None:
    code = (
        "import torch; p = torch.cuda.get_device_properties(0); "
        "print(torch.cuda.device_count(), p.total_memory, p.major, p.minor, '|', p.name)"
    )
    with simulated_devices("cuda", 1, memory="1GiB", capability=(8, 6), name="Test GPU"):
        done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"1 {2**30} 8 6 | Test GPU"


@pytest.mark.parametrize(
    "value", ["", ":2", "cuda:", "cuda:-1", "cuda:99999", "cuda:2;memory=lots", "cuda:2;x=1"]
)
def test_a_bad_variable_is_a_simulation_error(value: str) -> None:
    with pytest.raises(SimulationError, match=r"expected TYPE:COUNT"):
        _parse(value)


def test_the_report_header_says_when_children_cannot_inherit(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    import devicekit._startup

    pytester.makepyfile("def test_nothing():\n    pass\n")
    monkeypatch.setattr(devicekit._startup, "hook_installed", lambda: False)
    result = pytester.runpytest("-p", "no:cacheprovider", "--devicekit-simulate=cuda:2")
    result.stdout.fnmatch_lines(
        ["devicekit: devicekit_simulate.pth is not installed in site-packages, so child*"]
    )
    monkeypatch.setattr(devicekit._startup, "hook_installed", lambda: True)
    result = pytester.runpytest("-p", "no:cacheprovider", "--devicekit-simulate=cuda:2")
    result.stdout.no_fnmatch_line("*is not installed in site-packages*")
