"""devicekit's pytest plugin: simulated devices, device guards and device fixtures for tests.

Registered through the `pytest11` entry point, so installing devicekit is enough. It does no
work until used: its hooks return at once unless an option, a marker or a fixture of the plugin
is in play, and devicekit's modules (and torch) are imported inside the hooks that need them;
loading the plugin imports neither, since `devicekit/__init__.py` imports its names lazily.

Options (and their ini equivalents):

- `--devicekit-strict` (`devicekit_strict = true`): every test runs under
  `devicekit.device_guard("error")`.
- `--devicekit-simulate=cuda:2` (`devicekit_simulate = cuda:2`): every test runs under
  `devicekit.simulated_devices("cuda", 2)`; on a machine that really has CUDA, the real
  devices are used instead.

Markers: `@pytest.mark.device_guard(policy)`, `@pytest.mark.simulated_devices("cuda", 2)`,
`@pytest.mark.requires_device("cuda", count=2)`. Fixtures: `device` (each available device in
turn, simulated ones included) and `strict_devices`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Generator, Iterator
from typing import Any

import pytest

_SIMULATE_SPEC = re.compile(r"(?P<type>[a-z]+)(?::(?P<count>[1-9][0-9]*))?")
_SIMULATION = pytest.StashKey[contextlib.ExitStack]()
_MARKERS = (
    "device_guard(policy='error'): run the test under devicekit.device_guard(policy).",
    "simulated_devices(type='cuda', count=2): run the test under "
    "devicekit.simulated_devices(type, count); on a machine that has them, on the real devices.",
    "requires_device(type, count=1): skip the test unless the machine (or the active "
    "simulation) has at least count devices of that type.",
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
        help="Run every test under devicekit.simulated_devices(TYPE, COUNT), e.g. cuda:2.",
    )
    parser.addini(
        "devicekit_strict", "Run every test under devicekit.device_guard('error').", type="bool"
    )
    parser.addini(
        "devicekit_simulate", "Run every test under simulated devices, e.g. cuda:2.", default=""
    )


def _strict(config: pytest.Config) -> bool:
    option = config.getoption("devicekit_strict")
    return bool(config.getini("devicekit_strict") if option is None else option)


def _simulate(config: pytest.Config) -> tuple[str, int] | None:
    """The `--devicekit-simulate` setting as `(type, count)`, or `None` when it is off."""
    text = config.getoption("devicekit_simulate") or config.getini("devicekit_simulate")
    if not text:
        return None
    match = _SIMULATE_SPEC.fullmatch(str(text).strip())
    if match is None:
        raise pytest.UsageError(
            f"--devicekit-simulate={text}: expected TYPE or TYPE:COUNT, such as cuda:2."
        )
    return match["type"], int(match["count"] or 2)


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)
    _simulate(config)  # a malformed setting is a usage error before any test runs


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
            lines.append(f"devicekit: simulating {kind}:0 to {kind}:{count - 1} on the CPU")
    if _strict(config):
        lines.append("devicekit: every test runs under device_guard('error')")
    return lines


def _marker_simulation(item: pytest.Item) -> tuple[str, int] | None:
    marker = item.get_closest_marker("simulated_devices")
    if marker is None:
        return _simulate(item.config)
    kind = marker.kwargs.get("type", marker.args[0] if marker.args else "cuda")
    count = marker.kwargs.get("count", marker.args[1] if len(marker.args) > 1 else 2)
    return str(kind), int(count)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    stack = contextlib.ExitStack()
    item.stash[_SIMULATION] = stack
    simulation = _marker_simulation(item)
    if simulation is not None:
        kind, count = simulation
        real = _really_has(kind)
        if real:
            if real < count:
                pytest.skip(f"needs {count} {kind} devices; this machine has {real}")
        else:
            from devicekit._simulate import simulated_devices

            stack.enter_context(simulated_devices(kind, count))
    required = item.get_closest_marker("requires_device")
    if required is not None:
        _check_required(required)


def _check_required(marker: pytest.Mark) -> None:
    if not marker.args and "type" not in marker.kwargs:
        raise pytest.UsageError("@pytest.mark.requires_device needs a device type: ('cuda', 2)")
    kind = str(marker.kwargs.get("type", marker.args[0] if marker.args else ""))
    count = int(marker.kwargs.get("count", marker.args[1] if len(marker.args) > 1 else 1))
    import devicekit

    infos = devicekit.devices()
    found = [info for info in infos if info.type == kind]
    if len(found) < count:
        listed = ", ".join(
            f"{info.device} (simulated)" if info.simulated else str(info.device) for info in infos
        )
        pytest.skip(f"requires {count} {kind} device(s), found {len(found)}; available: {listed}")


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


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        stack = item.stash.get(_SIMULATION, None)
        if stack is not None:
            stack.close()


def _device_values(config: pytest.Config, simulation: tuple[str, int] | None) -> list[str]:
    import devicekit

    values = [str(info.device) for info in devicekit.devices()]
    if simulation is not None:
        kind, count = simulation
        if not _really_has(kind):
            values.extend(f"{kind}:{index}" for index in range(count))
    return values


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" not in metafunc.fixturenames:
        return
    definitions = metafunc._arg2fixturedefs.get("device", ())
    if not definitions or definitions[-1].func is not _device_fixture_function:
        return  # the project defines its own `device` fixture
    simulation = None
    marker = metafunc.definition.get_closest_marker("simulated_devices")
    if marker is not None:
        kind = marker.kwargs.get("type", marker.args[0] if marker.args else "cuda")
        count = marker.kwargs.get("count", marker.args[1] if len(marker.args) > 1 else 2)
        simulation = (str(kind), int(count))
    else:
        simulation = _simulate(metafunc.config)
    values = _device_values(metafunc.config, simulation)
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
