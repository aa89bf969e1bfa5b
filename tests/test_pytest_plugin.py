"""The pytest plugin, tested by running pytest on sample test files (`pytester`)."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="these runs simulate CUDA; on a CUDA machine it is real"
)

BUGGY_MODEL = """
    import torch


    class Scaled(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.linear = torch.nn.Linear(n, n)
            self.n = n

        def forward(self, x):
            positions = torch.arange({arange_args})
            return self.linear(x) * positions


    def test_forward(device):
        model = Scaled(4).to(device)
        out = model(torch.ones(2, 4, device=device))
        assert out.shape == (2, 4)
        assert out.device == device
"""


def _entry_point_installed() -> bool:
    found = importlib.metadata.entry_points(group="pytest11", name="devicekit")
    return any(entry.value == "devicekit._pytest_plugin" for entry in found)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    plugin = [] if _entry_point_installed() else ["-p", "devicekit._pytest_plugin"]
    return pytester.runpytest(*plugin, "-p", "no:cacheprovider", *args)


def test_planted_bug_is_caught_under_simulation(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_model=BUGGY_MODEL.format(arange_args="self.n"))
    result = run(pytester, "--devicekit-simulate=cuda:2")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_forward?cuda:0?*",
            "E *CrossDeviceError: Tensor.__mul__: expected all tensors on one device, "
            "but found cuda:0 and cpu.",
            "E *self: f32?2,4? @ cuda:0",
            "E *other: i64?4? @ cpu",
            "E *called from *test_model.py:12: return self.linear(x) * positions",
            "E *Fix: create or move every operand onto cuda:0 first*",
        ]
    )
    result.stdout.no_fnmatch_line("*_simulate.py:*in __torch_function__*")


def test_planted_bug_goes_unnoticed_without_simulation(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_model=BUGGY_MODEL.format(arange_args="self.n"))
    run(pytester).assert_outcomes(passed=1)  # only `cpu` here: the bug hides


def test_fixed_model_passes_on_every_device(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_model=BUGGY_MODEL.format(arange_args="self.n, device=x.device"))
    result = run(pytester, "--devicekit-simulate=cuda:2", "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_forward?cpu? PASSED*", "*test_forward?cuda:1? PASSED*"])


def test_ini_settings_work_like_the_options(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndevicekit_simulate = cuda:2\ndevicekit_strict = true\n")
    pytester.makepyfile(test_model=BUGGY_MODEL.format(arange_args="self.n"))
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "devicekit: simulating cuda:0 to cuda:1 on the CPU",
            "devicekit: every test runs under device_guard('error')",
        ]
    )


def test_malformed_simulate_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run(pytester, "--devicekit-simulate=cuda:two")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--devicekit-simulate=cuda:two: expected TYPE or TYPE:COUNT*"])


MIXED_META = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    def mix():
        return F.linear(torch.ones(2, 3), torch.ones(4, 3, device="meta"))
    """
)


def test_strict_option_guards_every_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mix=MIXED_META + "\ndef test_mix():\n    mix()\n")
    run(pytester).assert_outcomes(passed=1)  # torch itself accepts cpu @ meta silently
    result = run(pytester, "--devicekit-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["E *CrossDeviceError: torch.nn.functional.linear got tensors on different devices*"]
    )


def test_device_guard_marker_and_strict_devices_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_mix=MIXED_META
        + textwrap.dedent(
            """
            import pytest
            import warnings
            import devicekit

            @pytest.mark.device_guard("error")
            def test_marked():
                mix()

            @pytest.mark.device_guard("warn")
            def test_warned():
                with pytest.warns(devicekit.DeviceMismatchWarning):
                    mix()

            def test_fixture(strict_devices):
                assert strict_devices == "error"
                mix()
            """
        )
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["FAILED *test_marked*", "FAILED *test_fixture*"])


def test_simulated_devices_marker_and_requires_device(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import torch

        @pytest.mark.simulated_devices("cuda", 3)
        def test_three():
            assert torch.cuda.device_count() == 3

        @pytest.mark.simulated_devices("cuda", 3)
        def test_device_fixture_follows_the_marker(device):
            assert torch.ones(1, device=device).device == device

        @pytest.mark.requires_device("cuda", count=2)
        def test_needs_two():
            assert torch.cuda.device_count() >= 2

        @pytest.mark.simulated_devices("cuda", 2)
        @pytest.mark.requires_device("cuda", count=2)
        def test_needs_two_simulated():
            assert torch.cuda.device_count() == 2

        def test_restored_after_each_test():
            assert not torch.cuda.is_available()
        """
    )
    result = run(pytester, "-rs", "-p", "no:randomly")
    result.assert_outcomes(passed=7, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * requires 2 cuda device(s), found 0; available: cpu"])


def test_fixtures_work_inside_hypothesis_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch
        from hypothesis import given, settings, strategies as st

        @settings(max_examples=5)
        @given(n=st.integers(1, 3))
        def test_scaled(device, strict_devices, n):
            assert (torch.ones(n, device=device) * 2).device == device

        @settings(max_examples=5)
        @given(n=st.integers(1, 3))
        def test_bug_found_inside_given(device, n):
            torch.ones(n, device=device) + torch.ones(n)
        """
    )
    result = run(pytester, "--devicekit-simulate=cuda:2")
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines(["*CrossDeviceError*found cuda:0 and cpu*"])


def test_a_project_device_fixture_wins(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def device():
            return "mine"
        """
    )
    pytester.makepyfile("def test_own(device):\n    assert device == 'mine'\n")
    run(pytester, "--devicekit-simulate=cuda:2").assert_outcomes(passed=1)


def test_plugin_module_imports_nothing_heavy_at_the_top() -> None:
    """torch and devicekit's modules are imported inside the hooks that need them."""
    import devicekit._pytest_plugin as plugin

    source = Path(plugin.__file__).read_text(encoding="utf-8")
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert top_level == [
        "from __future__ import annotations",
        "import contextlib",
        "import re",
        "from collections.abc import Generator, Iterator",
        "from typing import Any",
        "import pytest",
    ]
