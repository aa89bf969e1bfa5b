from __future__ import annotations

import json
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
