"""Shared test setup: the fakes plugin and the hypothesis profiles.

Two profiles, chosen with the environment variable `DEVICEKIT_HYPOTHESIS_PROFILE`:

- `ci` (the default): each property's own `max_examples` (100 where it sets none), so that the
  whole suite runs in minutes on 2 cores; derandomised when `CI` is set, so a failure on CI
  reproduces anywhere.
- `soak`: at least `SOAK_EXAMPLES` examples for every property, its own `max_examples`
  included, random: `DEVICEKIT_HYPOTHESIS_PROFILE=soak pytest tests` runs for hours.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.fakes"]

PROFILE_VARIABLE = "DEVICEKIT_HYPOTHESIS_PROFILE"
SOAK_EXAMPLES = 5000

# Machines are 2 cores and noisy: no deadlines.
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=100,
    derandomize=bool(os.environ.get("CI")),
)
settings.register_profile(
    "soak",
    parent=settings.get_profile("ci"),
    max_examples=SOAK_EXAMPLES,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get(PROFILE_VARIABLE, "ci") or "ci"
if PROFILE not in ("ci", "soak"):
    raise pytest.UsageError(
        f"{PROFILE_VARIABLE}={PROFILE!r}: expected 'ci' (the default) or 'soak'."
    )
settings.load_profile(PROFILE)
collect_ignore = ["typing"]


# Tests that assert the plain machine by design run with `--devicekit-simulate`'s run-wide
# simulation paused (`@pytest.mark.no_simulation`): a node id, or the prefix of node ids, and why.
PLAIN_MACHINE = {
    # Blocks that push their own torch function mode and check the mode stack is empty around them.
    "tests/test_context.py": "default_device checks that its mode is the only one on the stack",
    "tests/test_scope.py": "scoped objects check that no mode and no simulation is active",
    "tests/test_interrupts.py": "interrupts at each step check that the mode stack ends empty",
    "tests/test_guard.py::TestScoping::test_nested_guards_restore_the_outer_policy": "counts modes",
    "tests/test_guard.py::TestScoping::test_other_threads_are_unaffected": "counts thread modes",
    "tests/test_benchmarks.py::test_bench_default_device": "checks the device is cpu after it",
    "tests/test_benchmarks.py::test_bench_guard": "checks the mode stack is empty after it",
    # Faked backends and NVML: a machine described by monkeypatched torch.cuda, not a simulation.
    "tests/test_discovery.py::TestEmulatedBackends": "fakes torch.cuda's answers",
    "tests/test_discovery.py::TestAutoIsOneAnswer": "'auto' on a faked or plain machine",
    "tests/test_discovery.py::test_discovery_and_resolve_do_not_import_the_default_device_module": (
        "a fresh interpreter, which would inherit the simulation"
    ),
    "tests/test_nvml.py": "fakes NVML and torch.cuda's answers",
    # Fresh interpreters that check importing devicekit leaves a plain machine plain.
    "tests/test_import_side_effects.py::test_does_not_initialise_accelerators": "child simulated",
    "tests/test_import_side_effects.py::test_does_not_change_torch_defaults": "child simulated",
    # What is left once a simulation ends: torch's own functions, no records, no warnings.
    "tests/test_backward.py::test_the_guard_covers_backward_only_while_a_block_is_active": (
        "the backward engine is wrapped while a simulation is active"
    ),
    "tests/test_provenance.py::test_nothing_is_recorded_outside_a_guard_or_simulation": (
        "a simulation records where tensors are made"
    ),
    "tests/test_simulate_autocast.py::test_outside_a_simulation_autocast_cuda_changes_nothing"
    "_on_the_cpu": "outside a simulation",
    "tests/test_simulate_compile.py::test_after_the_simulation_torch_compile_is_torchs_own": (
        "torch.compile is patched while a simulation is active"
    ),
    "tests/test_simulate_parallel.py::test_comm_is_torchs_own_again_after_the_simulation": (
        "nn.parallel's comm functions are patched while a simulation is active"
    ),
    "tests/test_prefetch.py::test_benchmark_runs": "checks the GPU section is skipped without CUDA",
    # A simulation of their own, fresh: nothing before it, everything restored after it.
    "tests/test_simulate_run.py": "the run-wide option and nesting, from a plain start",
    "tests/test_simulate.py::test_tensors_are_ordinary_after_the_block": "after the block",
    "tests/test_simulate.py::test_torch_cuda_answers_inside_and_is_restored": "after the block",
    "tests/test_simulate.py::test_everything_is_restored_after_an_exception": "after the block",
    "tests/test_simulate.py::test_decorator_runs_each_call_in_a_fresh_block": "after the block",
    "tests/test_simulate.py::test_a_real_device_type_is_refused": "fakes a machine with CUDA",
    "tests/test_simulate_cuda.py::test_default_facts_are_an_h100s": "free memory of a fresh block",
    "tests/test_simulate_cuda.py::test_facts_are_restored_after_the_block": "after the block",
    "tests/test_simulate_cuda.py::test_memory_counts_live_tensors": "memory of a fresh block",
    "tests/test_simulate_cuda.py::test_peaks_and_stats": "memory of a fresh block",
    "tests/test_simulate_cuda.py::test_allocated_is_the_sum_of_live_storages": "a fresh block",
    "tests/test_simulate_checkpoint.py::test_outside_the_simulation_loading_fails_as_on_a_cpu"
    "_only_machine": "outside a simulation",
    "tests/test_simulate_processes.py::test_a_child_started_outside_a_simulation_is_not"
    "_simulated": "a child started outside a simulation",
    "tests/test_simulate_processes.py::test_a_simulated_tensor_sent_to_a_process_without_the"
    "_simulation_is_refused": "a child without the simulation",
    "tests/test_backward.py::test_the_simulation_covers_backward_only_while_active": "after it",
    "tests/test_colocate.py::TestColocated::test_provenance_is_looked_up_inside_a_guard_or"
    "_simulation_only": "outside a simulation",
    "tests/test_testing.py::test_one_strategy_object_reads_the_devices_at_every_draw": (
        "draws from the devices of a plain machine, then of a block"
    ),
    # In-process pytester runs of the plugin, which would see the run-wide simulation.
    "tests/test_pytest_plugin.py::test_planted_bug_goes_unnoticed_without_simulation": "plain run",
    "tests/test_pytest_plugin.py::test_a_bad_marker_fails_its_own_test_only": "plain run",
    "tests/test_pytest_plugin.py::test_simulated_devices_marker_and_requires_device": "plain run",
}


def _plain_machine(nodeid: str) -> bool:
    return any(
        nodeid == prefix or nodeid.startswith((f"{prefix}::", f"{prefix}["))
        for prefix in PLAIN_MACHINE
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the `PLAIN_MACHINE` tests `no_simulation`; under `soak`, raise every property's own
    `max_examples` to at least `SOAK_EXAMPLES`.

    A test's `@settings(max_examples=...)` wins over the loaded profile, so the profile alone
    would soak only the properties that set no count. Hypothesis keeps a test's settings in
    `_hypothesis_internal_use_settings` and reads them when the test runs.
    """
    for item in items:
        if _plain_machine(item.nodeid):
            item.add_marker(pytest.mark.no_simulation)
    if PROFILE != "soak":
        return
    for item in items:
        test = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if isinstance(own, settings) and own.max_examples < SOAK_EXAMPLES:
            test._hypothesis_internal_use_settings = settings(own, max_examples=SOAK_EXAMPLES)
