from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devicekit._cli import main


def test_report_lists_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("devicekit device report (python ")
    assert "\n  cpu " in out
    assert "'auto' resolves to " in out


def test_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--device", "meta"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"][0]["device"] == "cpu"
    assert report["requested"] == {"spec": "meta", "device": "meta"}
    assert set(report["versions"]) >= {"torch", "cuda", "python"}
    assert set(report["auto"]) == {"device", "reason"}


def test_bad_device_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cuda:x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("devicekit: error: as_device('cuda:x'): not a device spec.")


def test_module_and_exit_status() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "devicekit", "--device", "tpu9"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "'tpu9' is not a torch device type" in done.stderr
    done = subprocess.run([sys.executable, "-m", "devicekit"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _devicekit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "devicekit", *args], capture_output=True, text=True, env=environment
    )


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"DEVICEKIT_DEVICE": "warp_drive"}, (), "'warp_drive' is not a torch device type"),
        ({"DEVICEKIT_DEVICE": "cpu:1"}, (), "DEVICEKIT_DEVICE='cpu:1'"),
        ({}, ("--device", "warp_drive:0"), "'warp_drive' is not a torch device type"),
        ({}, ("demo", "--device", "warp_drive"), "'warp_drive' is not a torch device type"),
    ],
    ids=["env-type", "env-index", "option", "demo-option"],
)
def test_a_bad_device_is_one_error_line_and_status_2(
    env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    done = _devicekit(*args, env=env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    name = "devicekit demo" if args[:1] == ("demo",) else "devicekit"
    assert done.stderr.startswith(f"{name}: error: ")
    assert message in done.stderr
    assert done.stderr.count("\n") == 1


def test_demo_on_meta_is_refused_before_anything_runs() -> None:
    done = _devicekit("demo", "--device", "meta")
    assert done.returncode == 2
    assert done.stdout == ""  # refused before the report, not after it
    assert done.stderr == (
        "devicekit demo: error: train('meta'): the demo trains a model and reports its loss and "
        "accuracy, which needs a device that computes values; meta tensors have shapes but no "
        "values. Use cpu, auto, or an accelerator such as cuda:0.\n"
    )


def test_a_reader_that_stops_early_ends_the_report_quietly() -> None:
    """`devicekit --json | head -c 5`: the pipe is closed before the report is written."""
    child = subprocess.Popen(
        [sys.executable, "-m", "devicekit", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stderr is not None
    child.stdout.close()  # the reader is gone before devicekit has imported torch
    errors = child.stderr.read().decode()
    child.stderr.close()
    assert child.wait() == 1  # Python's own status for EPIPE, as the `signal` docs recommend
    assert errors == ""


def test_the_demo_module_does_not_import_the_command_line() -> None:
    code = "import sys, devicekit._demo; print('devicekit._cli' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout == "False\n", done.stderr


_MODELS = """
import torch


class Leaky(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.mask = torch.ones(2, 2)


clean = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
split = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to("meta"))


def build():
    return {"encoder": clean, "rotary": Rotary()}


class Rotary(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(2), persistent=False)


def broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "audited_models.py").write_text(_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "audited_models", raising=False)


@pytest.mark.usefixtures("models")
def test_audit_a_class_with_findings_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "audited_models:Leaky", "--name", "net"]) == 1
    assert capsys.readouterr().out == (
        "audit(net): 1 error\n"
        "[error] plain-attribute-tensor: net.mask is a tensor (f32[2,2] @ cpu) held as a plain "
        "attribute of Leaky, not a registered buffer: Module.to() does not move it.\n"
        '    fix: Register it in Leaky.__init__: self.register_buffer("mask", ..., '
        "persistent=False) (persistent=True also saves it in the state_dict).\n"
    )


@pytest.mark.usefixtures("models")
def test_audit_clean_instances_and_factories_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "audited_models:clean"]) == 0
    assert capsys.readouterr().out == "audit(model): no findings.\n"
    assert main(["audit", "audited_models:build", "--info"]) == 0  # info is not a failure
    out = capsys.readouterr().out
    assert out.startswith("audit(model): 1 info\n[info] non-persistent-buffer: ")
    assert "model['rotary'].inv_freq" in out


@pytest.mark.usefixtures("models")
def test_audit_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "net.py").write_text(_MODELS)
    try:
        assert main(["audit", str(tmp_path / "sub" / "net.py") + ":Leaky"]) == 1
    finally:
        sys.modules.pop("net", None)
    assert capsys.readouterr().out.startswith("audit(model): 1 error\n")


@pytest.mark.usefixtures("models")
def test_audit_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "audited_models:Leaky", "--json"]) == 1
    (finding,) = json.loads(capsys.readouterr().out)
    assert finding["path"] == "model.mask"
    assert finding["kind"] == "plain-attribute-tensor"
    assert finding["severity"] == "error"
    assert finding["fix"].startswith('Register it in Leaky.__init__: self.register_buffer("mask"')
    assert main(["audit", "audited_models:clean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.usefixtures("models")
def test_audit_warnings_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "audited_models:split"]) == 1
    assert capsys.readouterr().out.startswith("audit(model): 1 warning\n[warning] mixed-devices")


@pytest.mark.usefixtures("models")
@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "audited_models",
            "'audited_models': expected MODULE:ATTRIBUTE, such as mypackage.models:build_model or "
            "models.py:Model (a module instance, or a class or function that builds one with no "
            "arguments).",
        ),
        (
            "no_such_module:model",
            "'no_such_module:model': cannot import 'no_such_module': ModuleNotFoundError: No "
            "module named 'no_such_module'",
        ),
        (
            "missing.py:Model",
            "'missing.py:Model': cannot import 'missing.py': FileNotFoundError: no Python file "
            "missing.py",
        ),
        (
            "audited_models:Missing",
            "'audited_models:Missing': audited_models has no attribute 'Missing'.",
        ),
        (
            "audited_models:broken",
            "'audited_models:broken': calling broken() to build the model raised "
            "RuntimeError: no weights here",
        ),
    ],
    ids=["no-colon", "no-module", "no-file", "no-attribute", "factory-raises"],
)
def test_audit_usage_errors_exit_2(
    target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", target]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"devicekit audit: error: {message}\n"


def test_audit_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "audited_models.py").write_text(_MODELS)
    done = subprocess.run(
        [sys.executable, "-m", "devicekit", "audit", "audited_models:Leaky"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("audit(model): 1 error\n[error] plain-attribute-tensor: ")
