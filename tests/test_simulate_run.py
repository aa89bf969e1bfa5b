"""A simulation for the whole run: pytest's run-wide option, nested blocks, every thread.

The pytester runs check what real suites do at import and collection time (skipif with a bool,
`unittest.skipUnless`, device lists built at import); the rest checks nesting and threads in
this process.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import os
import queue
import threading
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import _simulate_mode
from devicekit._errors import CrossDeviceError, ScopeError
from devicekit._simulate import _paused, simulated_devices
from devicekit._startup import ENVIRONMENT_VARIABLE
from tests.machine import REAL_CUDA

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(
    REAL_CUDA, reason="these runs simulate CUDA; on a CUDA machine it is real"
)


@pytest.fixture(scope="module", autouse=True)
def _simulation_imports_loaded() -> None:
    """Load what entering a simulation imports before the in-process runs (see
    tests/test_pytest_plugin.py: pytester drops the modules a run imported)."""
    with devicekit.simulated_devices("xpu", 1):
        pass


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    found = importlib.metadata.entry_points(group="pytest11", name="devicekit")
    installed = any(entry.value == "devicekit._pytest_plugin" for entry in found)
    plugin = [] if installed else ["-p", "devicekit._pytest_plugin"]
    return pytester.runpytest(*plugin, "-p", "no:cacheprovider", *args)


# --- the run-wide option: what modules decide when they are imported -----------------------------

COLLECTION_TIME_CHECKS = """
    import unittest

    import pytest
    import torch

    DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    ON_CUDA = torch.ones(2, device="cuda:1") if torch.cuda.is_available() else None


    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    def test_skipif_with_a_bool():
        assert torch.ones(1, device="cuda").device == torch.device("cuda:0")


    class TestUnittest(unittest.TestCase):
        @unittest.skipUnless(torch.cuda.device_count() >= 2, "needs two GPUs")
        def test_skip_unless(self):
            self.assertEqual(torch.ones(1, device="cuda:1").device, torch.device("cuda:1"))


    @pytest.mark.parametrize("device", DEVICES)
    def test_device_list_built_at_import(device):
        assert torch.zeros(1, device=device).device == torch.device(device)


    def test_torch_device_set_at_import():
        assert torch_device == "cuda"
        assert (ON_CUDA * 2).device == torch.device("cuda:1")
"""


def test_import_time_checks_see_the_simulated_devices(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_gpu=COLLECTION_TIME_CHECKS)
    result = run(pytester, "--devicekit-simulate=cuda:2", "-rs")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        ["devicekit: simulating cuda:0 to cuda:1 on the CPU for the whole*"]
    )


def test_without_the_option_they_skip_or_fail_as_before(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_gpu=COLLECTION_TIME_CHECKS)
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1, skipped=2)  # cpu param / torch_device / skips


def test_the_ini_key_is_run_wide_too(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndevicekit_simulate = cuda:2\n")
    pytester.makepyfile(test_gpu=COLLECTION_TIME_CHECKS)
    run(pytester).assert_outcomes(passed=6)


def test_a_root_conftest_sees_the_simulation_when_imported(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import torch

        TEST_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


        def pytest_generate_tests(metafunc):
            if "dev" in metafunc.fixturenames:
                metafunc.parametrize("dev", TEST_DEVICES)
        """
    )
    pytester.makepyfile(
        "import torch\n\n"
        "def test_on(dev):\n"
        "    assert torch.ones(1, device=dev).is_cuda == (dev == 'cuda')\n"
    )
    run(pytester, "--devicekit-simulate=cuda:2", "-v").stdout.fnmatch_lines(
        ["*test_on?cpu? PASSED*", "*test_on?cuda? PASSED*"]
    )


def test_the_simulation_lasts_the_session_and_ends_with_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, torch

        def test_first():
            assert torch.cuda.device_count() == 2
            assert os.environ["DEVICEKIT_SIMULATE"] == "cuda:2"

        def test_second():
            assert torch.cuda.is_available()
        """
    )
    run(pytester, "--devicekit-simulate=cuda:2").assert_outcomes(passed=2)
    assert _simulate_mode._active is None
    assert not torch.cuda.is_available()
    assert ENVIRONMENT_VARIABLE not in os.environ


def test_no_simulation_marker_pauses_the_run_for_one_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, pytest, torch

        @pytest.mark.no_simulation
        def test_real_only(device):
            assert not torch.cuda.is_available()
            assert "DEVICEKIT_SIMULATE" not in os.environ
            assert device == torch.device("cpu")

        def test_after():
            assert torch.cuda.device_count() == 2
        """
    )
    result = run(pytester, "--devicekit-simulate=cuda:2", "--strict-markers", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_real_only?cpu? PASSED*"])


def test_a_projects_own_block_joins_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest, torch, devicekit

        def test_same_devices():
            x = torch.ones(1, device="cuda:1")
            with devicekit.simulated_devices("cuda", 2) as devices:
                assert devices == [torch.device("cuda:0"), torch.device("cuda:1")]
                assert (x + 1).device == torch.device("cuda:1")
            assert torch.cuda.device_count() == 2

        def test_other_devices_pause_the_run():
            with devicekit.simulated_devices("cuda", 1):
                assert torch.cuda.device_count() == 1
            assert torch.cuda.device_count() == 2

        @pytest.mark.simulated_devices("cuda", 2)
        def test_marker_for_the_same_devices():
            assert torch.cuda.device_count() == 2

        @pytest.mark.simulated_devices("xpu", 1)
        def test_marker_for_other_devices():
            assert torch.xpu.device_count() == 1 and not torch.cuda.is_available()
        """
    )
    result = run(pytester, "--devicekit-simulate=cuda:2")
    result.assert_outcomes(passed=4)
    result.stdout.no_fnmatch_line("*do not nest*")


def test_requires_device_skip_points_at_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_needs="""
        import pytest

        @pytest.mark.requires_device("cuda", count=4)
        def test_four():
            pass
        """
    )
    result = run(pytester, "--devicekit-simulate=cuda:2", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED ?1? test_needs.py:3: requires 4 cuda device(s), found 2*"]
    )
    result.stdout.no_fnmatch_line("*_pytest_plugin.py*")


def test_threads_of_a_test_are_simulated_in_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import concurrent.futures, torch

        def test_pool():
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                made = pool.map(lambda i: torch.ones(1, device=f"cuda:{i}"), [0, 1])
                devices = [str(x.device) for x in made]
            assert devices == ["cuda:0", "cuda:1"]
        """
    )
    run(pytester, "--devicekit-simulate=cuda:2").assert_outcomes(passed=1)


# --- nested blocks and the environment variable ---------------------------------------------------


def test_entering_sets_the_variable_and_leaving_restores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "kept")
    with simulated_devices("cuda", 2):
        assert os.environ[ENVIRONMENT_VARIABLE] == "cuda:2"
        with simulated_devices("xpu", 1):
            assert os.environ[ENVIRONMENT_VARIABLE] == "xpu:1"
        assert os.environ[ENVIRONMENT_VARIABLE] == "cuda:2"
    assert os.environ[ENVIRONMENT_VARIABLE] == "kept"
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    with simulated_devices("cuda", 1):
        pass
    assert ENVIRONMENT_VARIABLE not in os.environ


def test_a_block_for_the_same_devices_joins() -> None:
    with simulated_devices("cuda", 2):
        torch.cuda.set_device(1)
        x = torch.ones(2, device="cuda")
        with simulated_devices("cuda", 2):
            assert torch.cuda.current_device() == 1
            assert (x * 2).device == torch.device("cuda:1")
        assert torch.cuda.is_available()
        assert (x + 1).device == torch.device("cuda:1")
    assert not torch.cuda.is_available()


def test_a_block_for_other_devices_pauses_and_resumes_the_active_one() -> None:
    with simulated_devices("cuda", 2):
        torch.cuda.set_device(1)
        x = torch.ones(2, device="cuda:1")
        with simulated_devices("cuda", 1):
            assert torch.cuda.device_count() == 1
            assert torch.cuda.current_device() == 0
            with pytest.raises(CrossDeviceError):
                torch.ones(2, device="cuda:0") + torch.ones(2)
        assert torch.cuda.device_count() == 2
        assert torch.cuda.current_device() == 1
        assert (x + 1).device == torch.device("cuda:1")
    assert _simulate_mode._active is None


def test_simulations_exit_in_reverse_order() -> None:
    outer, inner = simulated_devices("cuda", 2), simulated_devices("xpu", 1)
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(ScopeError, match=r"\(simulated_devices\('xpu', 1\)\); they are ended too"):
        outer.__exit__(None, None, None)
    with pytest.raises(ScopeError, match=r"this simulation is not active"):
        inner.__exit__(None, None, None)
    assert _simulate_mode._active is None
    assert not torch.cuda.is_available()


def test_paused_runs_real_and_resumes() -> None:
    with simulated_devices("cuda", 2):
        with _paused():
            assert not torch.cuda.is_available()
            assert ENVIRONMENT_VARIABLE not in os.environ
        assert torch.cuda.device_count() == 2
        assert os.environ[ENVIRONMENT_VARIABLE] == "cuda:2"


# --- every thread -------------------------------------------------------------------------------


def test_pool_workers_see_the_simulated_devices() -> None:
    def work(index: int) -> tuple[str, str]:
        x = torch.ones(3, device=f"cuda:{index}")
        return str(x.device), str((x * 2).sum().device)

    with simulated_devices("cuda", 2), concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(work, [0, 1])) == [("cuda:0", "cuda:0"), ("cuda:1", "cuda:1")]


def test_thread_subclasses_overriding_run_are_simulated_and_checked() -> None:
    class Worker(threading.Thread):
        error: BaseException | None = None

        def run(self) -> None:
            try:
                torch.ones(2, device="cuda:0") + torch.ones(2, device="cuda:1")
            except BaseException as error:
                self.error = error

    with simulated_devices("cuda", 2):
        worker = Worker()
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert isinstance(worker.error, CrossDeviceError)
    assert "cuda:0 and cuda:1" in str(worker.error)


def test_each_thread_has_its_own_current_device_starting_at_zero() -> None:
    seen: dict[str, int] = {}

    def work() -> None:
        seen["new thread"] = torch.cuda.current_device()
        torch.cuda.set_device(1)
        seen["after set"] = torch.ones(1, device="cuda").get_device()

    with simulated_devices("cuda", 2):
        torch.cuda.set_device(1)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
        torch.cuda.set_device(0)
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
        assert torch.cuda.current_device() == 0
    assert seen == {"new thread": 0, "after set": 1}


@settings(max_examples=20)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_threads_keep_their_own_current_device(indices: list[int]) -> None:
    barrier = threading.Barrier(len(indices))
    got: dict[int, int] = {}

    def work(position: int, index: int) -> None:
        torch.cuda.set_device(index)
        barrier.wait()  # every thread has set its device before any reads it
        got[position] = torch.zeros(1, device="cuda").get_device()

    with simulated_devices("cuda", 4):
        threads = [
            threading.Thread(target=work, args=(position, index))
            for position, index in enumerate(indices)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert got == dict(enumerate(indices))


def test_device_guard_stays_per_thread() -> None:
    results: list[str] = []

    def unguarded() -> None:
        x = torch.ones(2, device="cuda:0")
        results.append(str(x.device))

    with simulated_devices("cuda", 2), devicekit.device_guard("error"):
        thread = threading.Thread(target=unguarded)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert results == ["cuda:0"]


def test_threads_left_running_let_calls_through_after_the_block() -> None:
    go, done = threading.Event(), threading.Event()
    after: list[str] = []

    def late() -> None:
        go.wait()
        after.append(str(torch.ones(1).device))
        done.set()

    with simulated_devices("cuda", 2):
        thread = threading.Thread(target=late)
        thread.start()
    go.set()
    done.wait(10)
    thread.join(timeout=120)
    assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    assert after == ["cpu"]
    assert threading.Thread._bootstrap_inner.__name__ == "_bootstrap_inner"  # type: ignore[attr-defined]
    assert threading.Thread.__dict__["_bootstrap_inner"].__module__ == "threading"


def test_a_dataloaders_pin_memory_thread_is_simulated() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(8.0).reshape(8, 1))
    with simulated_devices("cuda", 2):
        torch.cuda.set_device(1)
        loader = DataLoader(data, batch_size=4, pin_memory=True, num_workers=2)
        batches = [features for (features,) in loader]
        moved = [features.to("cuda", non_blocking=True) for features in batches]
        assert [features.is_pinned() for features in batches] == [True, True]
        assert [str(features.device) for features in moved] == ["cuda:1", "cuda:1"]
    assert torch.cat(moved).flatten().tolist() == [float(i) for i in range(8)]


# --- threads already running when a simulation begins ----------------------------------------


def _in_thread_started_before(*jobs: Any) -> list[str]:
    """Each job's outcome, run one after the other inside a simulation by a thread that was
    started before it: `ok: <value>` or `<error type>: <message>`."""
    requests: queue.Queue[Any] = queue.Queue()
    answers: queue.Queue[str] = queue.Queue()

    def serve() -> None:
        while (job := requests.get()) is not None:
            try:
                answers.put(f"ok: {job()}")
            except Exception as error:
                answers.put(f"{type(error).__name__}: {error}")

    thread = threading.Thread(target=serve, name="started-before")
    thread.start()
    outcomes = []
    try:
        with simulated_devices("cuda", 2):
            for job in jobs:
                requests.put(job)
                outcomes.append(answers.get(timeout=120))
    finally:
        requests.put(None)
        thread.join(timeout=120)
    assert not thread.is_alive(), "a thread did not finish within 120 s (a deadlock?)"
    return outcomes


def test_a_thread_started_before_the_simulation_is_refused_by_name() -> None:
    """Issue 14 item 6: a clear `SimulationError`, never "Torch not compiled with CUDA
    enabled" (nor a dispatcher error) while `torch.cuda.is_available()` answers True."""
    outcomes = _in_thread_started_before(
        lambda: torch.ones(2, device="cuda").device,
        lambda: torch.ones(2).cuda().device,
        lambda: torch.zeros(2).to("cuda:1").device,
        lambda: torch.cuda.is_available(),
        lambda: torch.ones(2).device,
    )
    for outcome in outcomes[:3]:
        assert outcome.startswith(
            "SimulationError: Thread 'started-before' asked torch for a real cuda device at "
        )
        assert "but it was already running when simulated_devices('cuda', 2) began" in outcome
        assert outcome.endswith(
            "Start the thread inside the simulation, or simulate the whole run (pytest "
            "--devicekit-simulate=cuda:2 enters it before any test starts a thread)."
        )
    assert f"real cuda device at {__file__}:" in outcomes[0]  # the line that asked
    assert outcomes[3:] == ["ok: True", "ok: cpu"]


def test_torchs_own_cuda_functions_still_answer_in_any_thread() -> None:
    """`torch.cuda._lazy_init` refuses torch's C++ only: torch's Python functions that call it
    first (here `torch.cuda.random.get_rng_state_all`, which imports it by name) still work."""
    (outcome,) = _in_thread_started_before(lambda: len(torch.cuda.get_rng_state_all()))
    assert outcome == "ok: 2"
    with simulated_devices("cuda", 2):
        torch.cuda._lazy_init()  # a direct Python call: nothing to do
