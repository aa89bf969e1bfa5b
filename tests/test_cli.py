from __future__ import annotations

import json
import os
import subprocess
import sys

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
