"""Simulated accelerators for CPU-only test runs: `simulated_devices("cuda", 2)`.

Inside the block, a tensor "on" `cuda:1` is a real CPU tensor with a tag naming its simulated
device; `_simulate_mode` makes torch code see the tag and checks every op, `_simulate_patches`
makes `torch.cuda` (or the simulated type's module) and `torch.accelerator` answer for the
simulated devices. Autograd, optimizers and kernels only ever see CPU tensors, so values are
exactly those of the same code on the CPU. This module starts and ends a simulation.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from devicekit import _discovery, _modes, _simulate_async, _simulate_mode
from devicekit._errors import InvalidArgumentError, ScopeError, SimulationError
from devicekit._scope import locked, wrap
from devicekit._simulate_distributed import distributed_patches
from devicekit._simulate_facts import DEFAULT_FACTS, DeviceFacts
from devicekit._simulate_mode import _TAG, _Session, _SimulationMode
from devicekit._simulate_patches import _patches
from devicekit._simulate_threads import thread_patches
from devicekit._startup import ENVIRONMENT_VARIABLE, process_patches

__all__ = ["simulated_devices"]

F = TypeVar("F", bound=Callable[..., Any])

_SUPPORTED_TYPES = ("cuda", "xpu", "mps")
_MAX_COUNT = 16
_lock = threading.RLock()
_MISSING = object()


@dataclass
class _Entry:
    """One entered `simulated_devices` block, innermost last in `_entered`.

    `session` is the simulation it started, or `None` when it joined the active one (the same
    devices: a project's own block inside a run-wide `--devicekit-simulate`, or inside a child
    process that inherited the simulation). `suspended` is the simulation it paused to run its
    own (different devices), resumed when it exits; `environment` the previous value of
    `DEVICEKIT_SIMULATE`, restored when it exits.
    """

    owner: simulated_devices
    session: _Session | None
    suspended: _Session | None
    environment: str | None


_entered: list[_Entry] = []
assert _TAG  # re-exported: tests and tools look tags up by this name


def _really_has(device_type: str) -> bool:
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type == device_type:
        return True
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    return bool(callable(is_available) and is_available())


def _real_count(device_type: str) -> int:
    """How many `device_type` devices the machine really has (the simulated ones not counted)."""
    session = _simulate_mode._active
    if session is not None and session.type == device_type:
        return 0
    if not _really_has(device_type):
        return 0
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is not None and accelerator.type == device_type:
        return int(torch.accelerator.device_count())
    count = getattr(getattr(torch, device_type, None), "device_count", None)
    return int(count()) if callable(count) else 1


class simulated_devices:
    """Pretend this CPU-only machine has `count` accelerators of `type`, for tests.

    Inside the block, tensors created on or moved to `cuda:0` ... `cuda:{count-1}` live in CPU
    memory and compute real values, but report the simulated device everywhere: `.device`,
    `.is_cuda`, `.get_device()`, `devicekit.devices_of`. An op that mixes two simulated
    devices, or a simulated device with a non-scalar CPU tensor, raises `CrossDeviceError`, as
    real hardware would, including the ops torch leaves unchecked. 0-dim CPU tensors mix freely
    and index tensors may stay on the CPU, as on CUDA. `torch.cuda.is_available()`,
    `device_count()`, `current_device()`, `set_device()`, `synchronize()` and
    `torch.accelerator` answer for the simulated devices, and `devicekit.devices()` lists them
    with `simulated=True`.

    Usable as a context manager or a decorator of plain and `async` functions (each call runs
    in a fresh simulation). The simulation is process-wide: the thread that entered the block
    and every thread started while it is active see the simulated devices (each thread with its
    own current device, starting on index 0, as CUDA keeps it; threads already running before
    the block are not reached). Child processes inherit it: entering sets the environment
    variable `DEVICEKIT_SIMULATE` (e.g. `cuda:2`), which devicekit's start-up hook reads in every
    new Python process (`subprocess`, `multiprocessing`, DataLoader workers, `torchrun`), and
    leaving restores its previous value. Everything is restored on exit, exceptions and
    `KeyboardInterrupt` included, also when the block is left from another thread or out of
    order with other devicekit blocks. Tensors made inside the block are ordinary CPU tensors
    after it (and report their simulated device again in a later block that simulates it).

    Blocks nest: a block for the same type and count as the active simulation (a project's own
    block inside a run-wide `--devicekit-simulate`, or in a child process that inherited the
    simulation) joins it, and a block for other devices pauses the active simulation until it
    exits. A block with `races=True` inside a simulation without it pauses that one too; a
    block without it joins a racing simulation of the same devices.

    Args:
        type: The device type to simulate: `"cuda"` (the default), `"xpu"` or `"mps"`.
        count: How many devices, from 1 to 16.
        memory: Each device's memory, in bytes or as a string such as `"80GiB"` or `"512MB"`
            (default 80 GiB). `torch.cuda.memory_allocated()` and friends count the tensors on
            it, and allocating past it raises `torch.OutOfMemoryError` as CUDA does.
        capability: The compute capability `(major, minor)` the devices report (default
            `(9, 0)`); bfloat16 is supported natively from `(8, 0)`.
        name: The name `torch.cuda.get_device_name()` reports (default an H100's,
            `"NVIDIA H100 80GB HBM3"`, with its 132 multiprocessors).
        races: Find stream races (default off): streams and events model time, the
            destination of a `non_blocking=True` copy holds NaN (or an integer dtype's
            extreme) until a synchronize, an event wait, `wait_stream` or an op on the copying
            stream orders it, and an op that reads or writes data out of order, or memory freed
            while another stream may still use it, raises `RaceError` naming both ops and their
            streams. It costs about 15% per op, and twice the time while side streams exist
            (see "Finding stream races on CPU"). Child processes do not inherit it.

    Raises:
        InvalidArgumentError: The type, count, memory, capability or name is not supported.
        SimulationError: The machine really has that device type. Inside the block, moving to
            an index beyond `count` raises it too.

    Example:
        Simulating two XPUs (this example also runs on CUDA machines, where simulating
        `"cuda"`, the default, is refused):

        >>> import torch, devicekit
        >>> with devicekit.simulated_devices("xpu", 2):
        ...     x = torch.ones(2, device="xpu:1")
        ...     print(x.device, x.is_xpu, torch.xpu.device_count(), (x * 2).tolist())
        xpu:1 True 2 [2.0, 2.0]
    """

    def __init__(
        self,
        type: str = "cuda",
        count: int = 2,
        *,
        memory: int | str | None = None,
        capability: tuple[int, int] | None = None,
        name: str | None = None,
        races: bool = False,
    ) -> None:
        if not isinstance(races, bool):
            raise InvalidArgumentError(
                f"simulated_devices({type!r}, {count!r}, races={races!r}): races must be True "
                f"or False, got {races!r}."
            )
        if type not in _SUPPORTED_TYPES:
            raise InvalidArgumentError(
                f"simulated_devices({type!r}, {count!r}): cannot simulate {type!r}. "
                f"Supported types: {', '.join(map(repr, _SUPPORTED_TYPES))}."
            )
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_COUNT:
            raise InvalidArgumentError(
                f"simulated_devices({type!r}, {count!r}): count must be an integer from 1 "
                f"to {_MAX_COUNT}, got {count!r}."
            )
        self.type = type
        self.count = count
        self.races = races
        self.facts = DeviceFacts.build(
            f"simulated_devices({type!r}, {count!r})", memory, capability, name
        )

    def __repr__(self) -> str:
        races = ", races=True" if self.races else ""
        return f"simulated_devices({self.type!r}, {self.count}{races})"

    def _environment_value(self) -> str:
        """What `DEVICEKIT_SIMULATE` says in child processes: `TYPE:COUNT`, then the facts
        that differ from the defaults (`;memory=BYTES;capability=MAJOR.MINOR;name=NAME`)."""
        value = f"{self.type}:{self.count}"
        if self.facts.total_memory != DEFAULT_FACTS.total_memory:
            value += f";memory={self.facts.total_memory}"
        if self.facts.capability != DEFAULT_FACTS.capability:
            value += ";capability={}.{}".format(*self.facts.capability)
        if self.facts.name != DEFAULT_FACTS.name:
            value += f";name={self.facts.name}"
        return value

    def _same_as(self, session: _Session) -> bool:
        facts = getattr(session.owner, "facts", None)
        racing = getattr(session.owner, "races", False)
        return (
            session.type == self.type
            and session.count == self.count
            and facts == self.facts
            and (racing or not self.races)  # a plain block joins a racing simulation
        )

    def __enter__(self) -> list[torch.device]:
        return locked(_lock, self._enter)

    def _enter(self) -> list[torch.device]:
        active = _simulate_mode._active
        devices = [torch.device(self.type, index) for index in range(self.count)]
        if active is not None and self._same_as(active):
            _entered.append(_Entry(self, None, None, None))
            return devices
        simulating = active is not None and active.type == self.type
        if not simulating and _really_has(self.type):
            raise SimulationError(
                f"{self!r}: this machine really has {self.type} devices, so devicekit will "
                f"not simulate them. Run on the real devices instead "
                f"(devicekit.devices() lists them)."
            )
        session = _Session(self.type, self.count)
        session.owner = self
        entry = _Entry(self, session, active, os.environ.get(ENVIRONMENT_VARIABLE))
        try:
            if active is not None:
                _stop(active)
            _entered.append(entry)
            os.environ[ENVIRONMENT_VARIABLE] = self._environment_value()
            _start(session)
        except BaseException:
            _leave(entry)
            raise
        return devices

    def __exit__(self, *exc: object) -> None:
        locked(_lock, lambda: self._exit(failing=exc[0] is not None))

    def _exit(self, *, failing: bool) -> None:
        mine = [entry for entry in _entered if entry.owner is self]
        if not mine:
            raise ScopeError(
                f"{self!r}: this simulation is not active, so it cannot be exited. Exit a "
                "simulation once, after entering it (a `with` statement always does)."
            )
        entry = mine[-1]
        later = _entered[_entered.index(entry) + 1 :]
        for inner in reversed(later):  # ended too: the state from before `self` comes back
            _leave(inner)
        _leave(entry)
        races = None if entry.session is None else _races(entry.session)
        if races is not None and races.hazards and not failing:
            races.raise_hazard()  # a free found unsafe after the block's last op
        if later and not failing:
            names = ", ".join(repr(inner.owner) for inner in later)
            raise ScopeError(
                f"{self!r}: exited while simulations entered after it were still active "
                f"({names}); they are ended too, and the state from before {self!r} is "
                "restored. Exit simulations in the reverse order of entering them (nested "
                "`with` statements always do)."
            )

    def __call__(self, function: F) -> F:
        """Use as a decorator of plain and `async` functions: each call runs in a fresh
        simulation."""
        return wrap(  # type: ignore[return-value]
            function,
            lambda: simulated_devices(
                self.type,
                self.count,
                memory=self.facts.total_memory,
                capability=self.facts.capability,
                name=self.facts.name,
                races=self.races,
            ),
            generators=repr(self),
        )


@contextlib.contextmanager
def _paused() -> Iterator[None]:
    """Run the body without the active simulation (if any), resuming it afterwards.

    The pytest plugin's `no_simulation` marker uses it inside a run-wide simulation. Child
    processes started meanwhile do not inherit the simulation.
    """
    session, environment = locked(_lock, _pause)
    try:
        yield
    finally:
        locked(_lock, lambda: _resume(session, environment))


def _pause() -> tuple[_Session | None, str | None]:
    """Stop the active simulation (if any): it, and the variable taken out of the environment."""
    session = _simulate_mode._active
    environment = None if session is None else os.environ.pop(ENVIRONMENT_VARIABLE, None)
    if session is not None:
        _stop(session)
    return session, environment


def _resume(session: _Session | None, environment: str | None) -> None:
    if environment is not None:
        os.environ[ENVIRONMENT_VARIABLE] = environment
    if session is not None and _simulate_mode._active is None:
        _start(session)


def _leave(entry: _Entry) -> None:
    """Undo `entry`: end its simulation, resume the one it paused, restore the variable."""
    try:
        if entry.session is not None:
            _stop(entry.session)
    finally:
        if entry in _entered:
            _entered.remove(entry)
        if entry.session is not None:
            if entry.environment is None:
                os.environ.pop(ENVIRONMENT_VARIABLE, None)
            else:
                os.environ[ENVIRONMENT_VARIABLE] = entry.environment
            if entry.suspended is not None and _simulate_mode._active is None:
                _start(entry.suspended)


def _start(session: _Session) -> None:
    """Patch torch, list the devices, mark the session active and push its mode, in that order.

    Each step is recorded before it is taken, so `_stop` undoes exactly what was done, however
    far this got. A session paused by a nested one is started again the same way.
    """
    replacements = {
        **_patches(session),
        **thread_patches(),
        **process_patches(session),
        **distributed_patches(session),
    }
    for (owner, name), value in replacements.items():
        session.saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)
    _discovery.register_simulated(
        _discovery.DeviceInfo(
            session.device(index),
            session.type,
            index,
            f"simulated {session.type}:{index}",
            simulated=True,
        )
        for index in range(session.count)
    )
    races = _races(session)
    session.mode = (
        _SimulationMode(session) if races is None else _simulate_async.RacingMode(session, races)
    )
    session.users = _modes.users()
    _simulate_mode._active = session
    _simulate_async.active = races
    session.users.acquire_instance(session.mode)


def _races(session: _Session) -> _simulate_async.Races | None:
    """The race finder's state of `session` (kept while a nested simulation pauses it), or
    `None` when it was entered without `races=True`."""
    if not getattr(session.owner, "races", False):
        return None
    state: dict[str, Any] = vars(session)
    races: _simulate_async.Races | None = state.get("_devicekit_races")
    if races is None:
        races = state["_devicekit_races"] = _simulate_async.Races(session)
    return races


def _stop(session: _Session) -> None:
    """End `session`, from any thread; safe to run again if interrupted."""
    try:
        _undo(session)
    except BaseException:
        _undo(session)
        raise


def _undo(session: _Session) -> None:
    races = vars(session).get("_devicekit_races")
    if races is not None:
        races.land_all()  # its tensors are plain CPU tensors from here on
    if _simulate_mode._active is session:
        _simulate_mode._active = None  # from here on its mode lets every call through
        _simulate_async.active = None
    if session.users is not None and session.mode is not None:
        session.users.release_instance(session.mode)
    for owner, name, value in reversed(session.saved):
        if value is _MISSING:
            if name in vars(owner):
                delattr(owner, name)
        else:
            setattr(owner, name, value)
    session.saved.clear()
    _discovery.clear_simulated()
