"""devicekit's pytest plugin: simulated devices, device guards and device fixtures for tests.

Registered through the `pytest11` entry point, so installing devicekit is enough. It does no
work until used: its hooks return at once unless an option, a marker or a fixture of the plugin
is in play, and devicekit's modules (and torch) are imported inside the hooks that need them;
loading the plugin imports neither, since `devicekit/__init__.py` imports its names lazily.

Options (and their ini equivalents):

- `--devicekit-strict` (`devicekit_strict = true`): every test runs under
  `devicekit.device_guard("error")`.
- `--devicekit-simulate=cuda:2` (`devicekit_simulate = cuda:2`): the whole run is simulated.
  `devicekit.simulated_devices("cuda", 2)` is entered as the session starts, before the root
  `conftest.py` and the test modules are imported, so import-time checks
  (`skipif(not torch.cuda.is_available())`, `unittest.skipUnless`, device lists built at import)
  see the simulated devices, and it is left when the session ends. Threads and child processes
  the tests start are simulated too. On a machine that really has CUDA, the real devices are
  used instead. Any value that names no simulation (`cpu`, `meta`, `tpu:2`, `cuda:17`) is a
  usage error before any test runs: CI never passes having tested nothing.
- `--devicekit-races` (`devicekit_races = true`): the simulations the plugin enters (run-wide
  and by marker) find stream races, `simulated_devices(..., races=True)`.

Markers: `@pytest.mark.device_guard(policy)`, `@pytest.mark.simulated_devices("cuda", 2)`
(the test runs under these simulated devices; inside a run-wide simulation of the same devices
it joins it, of others it pauses it), `@pytest.mark.no_simulation` (the test runs with the
run-wide simulation paused, on the real machine), `@pytest.mark.requires_device("cuda",
count=2)`. Fixtures: `device` (each available device in turn, simulated ones included) and
`strict_devices`. A marker with arguments it cannot use fails the marked test at setup, with a
message that says how to write it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Generator, Iterator
from typing import Any

import pytest

_SIMULATE_SPEC = re.compile(r"(?P<type>[a-z]+)(?::(?P<count>[0-9]+))?")
_SIMULATION = pytest.StashKey[contextlib.ExitStack]()
_SETTING = pytest.StashKey["tuple[str, int] | None"]()
_RUN = pytest.StashKey[contextlib.ExitStack]()
_MARKERS = (
    "device_guard(policy='error'): run the test under devicekit.device_guard(policy).",
    "simulated_devices(type='cuda', count=2): run the test under "
    "devicekit.simulated_devices(type, count); on a machine that has them, on the real devices.",
    "requires_device(type, count=1): skip the test unless the machine (or the active "
    "simulation) has at least count devices of that type.",
    "no_simulation: run the test with the run-wide simulation of --devicekit-simulate paused "
    "(for tests of real-only behaviour).",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("devicekit", "devicekit: device checks")
    group.addoption(
        "--devicekit-strict",
        action="store_true",
        default=None,
        help="Run every test under devicekit.device_guard('error').",
    )
    group.addoption(
        "--devicekit-simulate",
        metavar="TYPE:COUNT",
        default=None,
        help="Simulate TYPE:COUNT devices (e.g. cuda:2) for the whole run, from collection on.",
    )
    group.addoption(
        "--devicekit-races",
        action="store_true",
        default=None,
        help="Simulate with races=True: find stream races and non_blocking copies read too early.",
    )
    parser.addini(
        "devicekit_strict", "Run every test under devicekit.device_guard('error').", type="bool"
    )
    parser.addini("devicekit_races", "Simulate with races=True (the race finder).", type="bool")
    parser.addini(
        "devicekit_simulate",
        "Simulate TYPE:COUNT devices (e.g. cuda:2) for the whole run, from collection on.",
        default="",
    )


def _strict(config: pytest.Config) -> bool:
    option = config.getoption("devicekit_strict")
    return bool(config.getini("devicekit_strict") if option is None else option)


def _races(config: pytest.Config) -> bool:
    """`--devicekit-races`: simulations the plugin enters find stream races."""
    option = getattr(config.known_args_namespace, "devicekit_races", None)
    return bool(config.getini("devicekit_races") if option is None else option)


def _simulation_limits() -> tuple[tuple[str, ...], int]:
    """The device types `simulated_devices` can simulate, and the most devices it simulates."""
    from devicekit._simulate import _MAX_COUNT, _SUPPORTED_TYPES

    return tuple(_SUPPORTED_TYPES), _MAX_COUNT


def _accepted_forms() -> str:
    types, most = _simulation_limits()
    return (
        f"Expected TYPE or TYPE:COUNT, with TYPE one of {', '.join(types)} and COUNT from 1 "
        f"to {most} (2 when left out), such as cuda:2."
    )


def _parse_simulate(text: str, source: str) -> tuple[str, int]:
    """`text` (the value of `source`) as `(type, count)`; a usage error unless simulatable."""
    types, most = _simulation_limits()
    match = _SIMULATE_SPEC.fullmatch(text.strip())
    if match is None:
        problem = "not TYPE or TYPE:COUNT"
    elif match["type"] not in types:
        problem = f"devicekit cannot simulate {match['type']!r} devices"
        if match["type"] == "cpu":
            problem += " (the CPU is always there: leave the option out to test on it alone)"
    elif match["count"] is not None and not _in_range(match["count"], most):
        problem = f"cannot simulate {match['count']} devices"
    else:
        return match["type"], int(match["count"] or 2)
    raise pytest.UsageError(f"{source}: {problem}. {_accepted_forms()}")


def _in_range(count: str, most: int) -> bool:
    """Whether the digits `count` are a number from 1 to `most` (never parsing a huge one)."""
    return len(count.lstrip("0")) <= len(str(most)) and 1 <= int(count) <= most


def _read_simulate(config: pytest.Config) -> tuple[str, int] | None:
    # Read before `config.option` is filled in (`pytest_load_initial_conftests`) too.
    option = getattr(config.known_args_namespace, "devicekit_simulate", None)
    if option is None:
        option = config.getoption("devicekit_simulate")
    if option:
        return _parse_simulate(str(option), f"--devicekit-simulate={option}")
    ini = config.getini("devicekit_simulate")
    if ini:
        return _parse_simulate(str(ini), f"devicekit_simulate = {ini} (in the ini file)")
    return None


def _simulate(config: pytest.Config) -> tuple[str, int] | None:
    """The `--devicekit-simulate` setting as `(type, count)`, or `None` when it is off."""
    if _SETTING not in config.stash:
        config.stash[_SETTING] = _read_simulate(config)
    return config.stash[_SETTING]


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Enter the run-wide simulation before the root `conftest.py` files are imported."""
    simulate = _simulate(early_config)  # a bad setting is a usage error before any test
    if simulate is None or _RUN in early_config.stash:
        return
    kind, count = simulate
    if _really_has(kind):
        return
    from devicekit._simulate import simulated_devices

    stack = contextlib.ExitStack()
    stack.enter_context(simulated_devices(kind, count, races=_races(early_config)))
    early_config.stash[_RUN] = stack


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    _simulate(config)  # a setting that names no simulation is a usage error before any test


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    stack = config.stash.get(_RUN, None)
    if stack is not None:
        del config.stash[_RUN]
        stack.close()


def _really_has(device_type: str) -> int:
    """How many devices of `device_type` the machine really has (0 while none)."""
    from devicekit._simulate import _real_count

    return _real_count(device_type)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    simulate = _simulate(config)
    if simulate is not None:
        kind, count = simulate
        if _really_has(kind):
            lines.append(f"devicekit: this machine has {kind} devices; tests use the real ones")
        else:
            devices = f"{kind}:0" if count == 1 else f"{kind}:0 to {kind}:{count - 1}"
            lines.append(
                f"devicekit: simulating {devices} on the CPU for the whole run "
                "(@pytest.mark.no_simulation opts a test out)"
            )
            from devicekit._startup import PTH_NAME, hook_installed

            if not hook_installed():
                lines.append(
                    f"devicekit: {PTH_NAME} is not installed in site-packages, so child "
                    "processes run without the simulation (pip install devicekit, or "
                    "pip install -e . in a checkout, installs it)"
                )
    if _strict(config):
        lines.append("devicekit: every test runs under device_guard('error')")
    if _races(config):
        lines.append("devicekit: simulations find stream races (races=True)")
    return lines


class _BadMarker(Exception):
    """A devicekit marker with arguments it cannot use; fails the marked test only."""


def _simulated_devices_arguments(type: object = "cuda", count: object = 2) -> tuple[object, object]:
    return type, count


def _requires_device_arguments(type: object, count: object = 1) -> tuple[object, object]:
    return type, count


def _marker_arguments(marker: pytest.Mark) -> tuple[object, object]:
    """The marker's `(type, count)`, bound as a call of the marker's signature would bind them."""
    bind = (
        _simulated_devices_arguments
        if marker.name == "simulated_devices"
        else _requires_device_arguments
    )
    try:
        return bind(*marker.args, **marker.kwargs)
    except TypeError as error:
        example = "'cuda', 2" if marker.name == "simulated_devices" else "'cuda', count=2"
        raise _BadMarker(
            f"{_written(marker)}: {str(error).partition('() ')[2]}. "
            f"Write it as @pytest.mark.{marker.name}({example})."
        ) from None


def _written(marker: pytest.Mark) -> str:
    arguments = [repr(value) for value in marker.args]
    arguments += [f"{name}={value!r}" for name, value in marker.kwargs.items()]
    return f"@pytest.mark.{marker.name}({', '.join(arguments)})"


def _marker_simulation(marker: pytest.Mark) -> tuple[str, int]:
    """A `simulated_devices` marker's `(type, count)`; `_BadMarker` unless it is simulatable."""
    kind, count = _marker_arguments(marker)
    types, most = _simulation_limits()
    if kind not in types:
        problem = f"devicekit cannot simulate {kind!r} devices; the types are {', '.join(types)}"
    elif isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most:
        problem = f"count must be an integer from 1 to {most}, got {count!r}"
    else:
        return str(kind), count
    raise _BadMarker(
        f"{_written(marker)}: {problem}. Write it as "
        f"@pytest.mark.simulated_devices({kind if kind in types else 'cuda'!r}, 2)."
    )


def _simulation_for(item: pytest.Item) -> tuple[str, int] | None:
    marker = item.get_closest_marker("simulated_devices")
    if marker is None:
        return _simulate(item.config)
    return _marker_simulation(marker)


def _skip(reason: str) -> None:
    """Skip the running test, reported at the test's own file and line (as `skipif` does)."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    stack = contextlib.ExitStack()
    item.stash[_SIMULATION] = stack
    try:
        simulation = _simulation_for(item)
        required = item.get_closest_marker("requires_device")
        need = None if required is None else _required(required)
    except _BadMarker as error:
        problem: _BadMarker | None = error
    else:
        problem = None
    if problem is not None:
        pytest.fail(str(problem), pytrace=False)  # this test only, not its whole module
    run_wide = _RUN in item.config.stash
    if item.get_closest_marker("no_simulation") is not None:
        if run_wide:
            from devicekit._simulate import _paused

            stack.enter_context(_paused())
        simulation = None
    elif run_wide and item.get_closest_marker("simulated_devices") is None:
        simulation = None  # the run-wide simulation is in force already
    if simulation is not None:
        kind, count = simulation
        real = _really_has(kind)
        if real:
            if real < count:
                _skip(f"needs {count} {kind} devices; this machine has {real}")
        else:
            from devicekit._simulate import simulated_devices

            stack.enter_context(simulated_devices(kind, count, races=_races(item.config)))
    if need is not None:
        _check_required(*need)


def _required(marker: pytest.Mark) -> tuple[str, int]:
    """A `requires_device` marker's `(type, count)`; `_BadMarker` unless they make sense."""
    kind, count = _marker_arguments(marker)
    if not isinstance(kind, str) or not kind:
        problem = f"the device type must be a string such as 'cuda', got {kind!r}"
    elif isinstance(count, bool) or not isinstance(count, int) or count < 1:
        problem = f"count must be a positive integer, got {count!r}"
    else:
        return kind, count
    raise _BadMarker(
        f"{_written(marker)}: {problem}. Write it as @pytest.mark.requires_device('cuda', count=2)."
    )


def _check_required(kind: str, count: int) -> None:
    import devicekit

    infos = devicekit.devices()
    found = [info for info in infos if info.type == kind]
    if len(found) < count:
        listed = ", ".join(
            f"{info.device} (simulated)" if info.simulated else str(info.device) for info in infos
        )
        _skip(f"requires {count} {kind} device(s), found {len(found)}; available: {listed}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    with _guard_for(item):
        return (yield)


@contextlib.contextmanager
def _guard_for(item: pytest.Item) -> Iterator[None]:
    marker = item.get_closest_marker("device_guard")
    fixtures: Any = getattr(item, "fixturenames", ())
    if marker is not None:
        policy = marker.kwargs.get("policy", marker.args[0] if marker.args else "error")
    elif _strict(item.config) or "strict_devices" in fixtures:
        policy = "error"
    else:
        yield
        return
    from devicekit._guard import device_guard

    with device_guard(policy):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, object]:
    """A cross-device error's traceback ends at the user's line, not in torch's own frames
    (`--fulltrace` keeps them)."""
    excinfo = call.excinfo
    if (
        excinfo is not None
        and type(excinfo.value).__name__ == "CrossDeviceError"
        and not item.config.getoption("fulltrace", False)
    ):
        from devicekit._report import end_at_user_line  # torch is loaded: it raised

        end_at_user_line(excinfo)
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        stack = item.stash.get(_SIMULATION, None)
        if stack is not None:
            stack.close()


def _device_values(simulation: tuple[str, int] | None, *, real_only: bool = False) -> list[str]:
    import devicekit

    values = [
        str(info.device) for info in devicekit.devices() if not (real_only and info.simulated)
    ]
    if simulation is not None:
        kind, count = simulation
        if not _really_has(kind):
            simulated = [f"{kind}:{index}" for index in range(count)]
            values = [value for value in values if value not in simulated] + simulated
    return values


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" not in metafunc.fixturenames:
        return
    definitions = metafunc._arg2fixturedefs.get("device", ())
    if not definitions or definitions[-1].func is not _device_fixture_function:
        return  # the project defines its own `device` fixture
    real_only = metafunc.definition.get_closest_marker("no_simulation") is not None
    try:
        simulation = None if real_only else _simulation_for(metafunc.definition)
    except _BadMarker:
        simulation = None  # the test fails at setup, with the marker's message
    values = _device_values(simulation, real_only=real_only)
    metafunc.parametrize("device", values, indirect=True, ids=values, scope="session")


def _device_fixture_function(request: pytest.FixtureRequest) -> Any:
    import torch

    return torch.device(getattr(request, "param", "cpu"))


device = pytest.fixture(scope="session", name="device")(_device_fixture_function)
device.__doc__ = """Each device of this machine in turn (`cpu` first), as a `torch.device`.

With `--devicekit-simulate` or a `simulated_devices` marker, the simulated devices too. The
fixture is session-scoped (a device never changes), so it works in hypothesis `@given` tests.
"""


@pytest.fixture(scope="session")
def strict_devices() -> str:
    """Run the requesting test under `devicekit.device_guard("error")`.

    The guard is entered around the test's call (the plugin does it for every test that asks
    for this fixture), so it also holds inside hypothesis `@given` tests. The value is the policy.
    """
    return "error"
