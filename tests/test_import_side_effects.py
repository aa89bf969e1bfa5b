"""`import devicekit` must be free of side effects; each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def run_fresh(code: str) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_does_not_initialise_accelerators() -> None:
    result = run_fresh(
        """
        import json, torch, devicekit
        devicekit.devices(); devicekit.best_device(); devicekit.as_device("auto")
        print(json.dumps({"cuda": torch.cuda.is_initialized()}))
        """
    )
    assert result == {"cuda": False}


def test_does_not_import_test_tools() -> None:
    result = run_fresh(
        """
        import json, sys, devicekit
        print(json.dumps({m: m in sys.modules for m in ("pytest", "hypothesis", "_pytest")}))
        """
    )
    assert result == {"pytest": False, "hypothesis": False, "_pytest": False}


def test_does_not_change_the_environment() -> None:
    result = run_fresh(
        """
        import json, os
        before = dict(os.environ)
        import devicekit
        devicekit.devices(); devicekit.best_device()
        print(json.dumps({"same": dict(os.environ) == before}))
        """
    )
    assert result == {"same": True}


def test_does_not_change_torch_defaults() -> None:
    result = run_fresh(
        """
        import json, torch
        import devicekit
        from torch.overrides import _get_current_function_mode_stack
        print(json.dumps({
            "default": str(torch.get_default_device()),
            "modes": len(_get_current_function_mode_stack()),
        }))
        """
    )
    assert result == {"default": "cpu", "modes": 0}


def test_import_and_plugin_load_do_not_import_torch() -> None:
    """The pytest plugin loads in every test run of an environment with devicekit: keep it light."""
    result = run_fresh(
        """
        import json, sys
        import devicekit, devicekit._pytest_plugin
        print(json.dumps({"torch": "torch" in sys.modules}))
        """
    )
    assert result == {"torch": False}
