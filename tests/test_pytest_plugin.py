"""The pytest plugin, tested by running pytest on sample test files (`pytester`)."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path

import pytest

from tests.machine import REAL_CUDA

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(
    REAL_CUDA, reason="these runs simulate CUDA; on a CUDA machine it is real"
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


@pytest.fixture(scope="module", autouse=True)
def _simulation_imports_loaded() -> None:
    """Load what entering a simulation imports before any in-process run: pytester drops the
    modules a run imported, and a second, fresh copy of a module that patched torch (or of a
    torch library that registers itself) would not find the first copy's state."""
    import devicekit

    with devicekit.simulated_devices("xpu", 1):
        pass


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
            "E *CrossDeviceError: *cuda:0 and cpu*",
            "E *Tensor.__mul__ got tensors on different devices (cuda:0, cpu):",
            "E *self: f32?2,4? @ cuda:0",
            "E *other: i64?4? @ cpu",
            "E *made by torch.arange at *test_model.py:11: positions = torch.arange(self.n)",
            "E *called at *test_model.py:12: return self.linear(x) * positions",
            "E *Fix: create it on the device where it is used: "
            "`torch.arange(..., device=x.device)`.",
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
            "devicekit: simulating cuda:0 to cuda:1 on the CPU for the whole run*",
            "devicekit: every test runs under device_guard('error')",
        ]
    )


ACCEPTED = (
    "Expected TYPE or TYPE:COUNT, with TYPE one of cuda, xpu, mps and COUNT from 1 to 16 "
    "(2 when left out), such as cuda:2."
)
NOT_SIMULATABLE = [
    (
        "cpu",
        "devicekit cannot simulate 'cpu' devices (the CPU is always there: leave the option "
        "out to test on it alone)",
    ),
    (
        "cpu:2",
        "devicekit cannot simulate 'cpu' devices (the CPU is always there: leave the "
        "option out to test on it alone)",
    ),
    ("meta", "devicekit cannot simulate 'meta' devices"),
    ("foo", "devicekit cannot simulate 'foo' devices"),
    ("tpu:2", "devicekit cannot simulate 'tpu' devices"),
    ("cuda:0", "cannot simulate 0 devices"),
    ("cuda:17", "cannot simulate 17 devices"),
    ("cuda:99999", "cannot simulate 99999 devices"),
    ("cuda:" + "9" * 5000, "cannot simulate " + "9" * 5000 + " devices"),
    ("cuda:two", "not TYPE or TYPE:COUNT"),
    ("CUDA:2", "not TYPE or TYPE:COUNT"),
]


@pytest.mark.parametrize(("value", "problem"), NOT_SIMULATABLE, ids=lambda v: v[:12])
def test_an_option_that_simulates_nothing_is_a_usage_error(
    pytester: pytest.Pytester, value: str, problem: str
) -> None:
    pytester.makepyfile("def test_nothing(device): pass")
    result = run(pytester, f"--devicekit-simulate={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # not 0 with every test skipped, not 1
    assert result.stderr.lines[0] == f"ERROR: --devicekit-simulate={value}: {problem}. {ACCEPTED}"
    assert "collected" not in result.stdout.str()


@pytest.mark.parametrize(("value", "problem"), NOT_SIMULATABLE[:8], ids=lambda v: v[:12])
def test_an_ini_setting_that_simulates_nothing_is_a_usage_error(
    pytester: pytest.Pytester, value: str, problem: str
) -> None:
    pytester.makeini(f"[pytest]\ndevicekit_simulate = {value}\n")
    pytester.makepyfile("def test_nothing(device): pass")
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.lines[0] == (
        f"ERROR: devicekit_simulate = {value} (in the ini file): {problem}. {ACCEPTED}"
    )


def test_the_option_wins_over_the_ini_setting(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndevicekit_simulate = cpu\n")
    pytester.makepyfile("def test_devices(device): pass")
    run(pytester, "--devicekit-simulate=xpu:3").assert_outcomes(passed=4)


BAD_MARKERS = """
    import pytest

    def test_unmarked(device):
        pass

    @pytest.mark.simulated_devices("cuda", 2)
    def test_good_marker(device):
        pass

    @pytest.mark.simulated_devices({arguments})
    def test_bad_marker(device):
        pass
"""


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            '"cuda", "x"',
            "@pytest.mark.simulated_devices('cuda', 'x'): count must be an integer from 1 to 16, "
            "got 'x'. Write it as @pytest.mark.simulated_devices('cuda', 2).",
        ),
        (
            '"cuda", 99999',
            "@pytest.mark.simulated_devices('cuda', 99999): count must be an integer from 1 to "
            "16, got 99999. Write it as @pytest.mark.simulated_devices('cuda', 2).",
        ),
        (
            '"cpu", 2',
            "@pytest.mark.simulated_devices('cpu', 2): devicekit cannot simulate 'cpu' devices; "
            "the types are cuda, xpu, mps. Write it as @pytest.mark.simulated_devices('cuda', 2).",
        ),
        (
            'kind="xpu"',
            "@pytest.mark.simulated_devices(kind='xpu'): got an unexpected keyword argument "
            "'kind'. Write it as @pytest.mark.simulated_devices('cuda', 2).",
        ),
    ],
    ids=["count-x", "count-99999", "cpu", "keyword"],
)
def test_a_bad_marker_fails_its_own_test_only(
    pytester: pytest.Pytester, arguments: str, message: str
) -> None:
    pytester.makepyfile(BAD_MARKERS.format(arguments=arguments))
    result = run(pytester, "-rE")
    result.assert_outcomes(passed=4, errors=1)  # the module is collected, its other tests run
    result.stdout.fnmatch_lines(["*ERROR at setup of test_bad_marker[[]cpu[]]*", message])
    result.stdout.no_fnmatch_line("*int()*")
    result.stdout.no_fnmatch_line("*Traceback*")


def test_a_bad_requires_device_marker_fails_its_own_test_only(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_device("cuda", count="two")
        def test_bad():
            pass

        def test_fine():
            pass
        """
    )
    result = run(pytester, "-rE")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.requires_device('cuda', count='two'): count must be a positive integer, "
            "got 'two'. Write it as @pytest.mark.requires_device('cuda', count=2)."
        ]
    )


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
        [
            "E *CrossDeviceError: *cpu and meta*",
            "E *torch.nn.functional.linear got tensors on different devices*",
        ]
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
    result.stdout.fnmatch_lines(["*CrossDeviceError*cuda:0 and cpu*"])


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
