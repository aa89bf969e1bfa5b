"""Streams and events of simulated devices.

Work on the CPU is done when the call returns, so every stream is idle and every event has
happened; what remains of CUDA's semantics is which device a stream belongs to (entering
`torch.cuda.stream(s)` makes `s`'s device current, as CUDA does), which stream is current, and
the time an event was recorded (`elapsed_time` measures real wall-clock milliseconds).
Under `simulated_devices(..., races=True)` they also keep the race finder's clocks: each stream
counts its work and what it waited for, each recorded event carries a stamp of that, and waits
and synchronizations tell `_simulate_async` what is ordered after what.

The classes are subclasses of `torch.Stream`/`torch.Event` built on the CPU, so `isinstance`,
annotations and torch's C++ argument parsing (`tensor.record_stream(s)`) accept them.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import torch

from devicekit import _simulate_async, _simulate_mode
from devicekit._errors import SimulationError

__all__ = ["SimulatedEvent", "SimulatedStream", "Streams"]

_ids = itertools.count(1)
#: The active simulation's streams (set while it is active, by `_simulate_patches`).
active: Streams | None = None


def _session() -> Any:
    session = _simulate_mode._active
    if session is None:
        raise SimulationError(
            "torch.cuda.Stream/Event: no simulation is active. Create streams and events of "
            "simulated devices inside devicekit.simulated_devices(...)."
        )
    return session


def _state() -> Streams:
    state = active
    if state is None:
        raise SimulationError(
            "torch.cuda.stream(s): no simulation is active. Use streams of simulated devices "
            "inside devicekit.simulated_devices(...)."
        )
    return state


class SimulatedStream(torch.Stream):
    """A stream of a simulated device: everything queued on it has already run on the CPU."""

    _devicekit_device: torch.device
    _devicekit_id: int
    #: The race finder's clock (`_simulate_async`): work issued, and per other stream's id how
    #: much of its work this stream's later work runs after.
    _devicekit_count: int
    _devicekit_seen: dict[int, int]
    #: Takes the stream off the race finder's count of side streams when it is garbage.
    _devicekit_gone: Any

    def __new__(cls, device: object = None, priority: int = 0, **kwargs: Any) -> SimulatedStream:
        session = _session()
        simulated = session.resolve(device)
        if simulated is None:
            if device is not None:
                raise SimulationError(
                    f"torch.cuda.Stream(device={device!r}): not a simulated {session.type} "
                    f"device. Pass one of {session.type}:0 to "
                    f"{session.type}:{session.count - 1}, or None for the current one."
                )
            simulated = session.device(session.current)
        stream = torch.Stream.__new__(cls, device="cpu")
        stream._devicekit_device = simulated
        stream._devicekit_id = next(_ids)
        stream._devicekit_count = 0
        stream._devicekit_seen = {}
        races = _simulate_async.active
        if races is not None:
            races.stream_made(stream)  # `Streams.default` takes its own back
        return stream

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._devicekit_device

    @property
    def device_index(self) -> int:  # type: ignore[override]
        return self._devicekit_device.index or 0

    @property
    def device_type(self) -> int:  # type: ignore[override]
        return 1  # DeviceType.CUDA in c10's numbering

    @property
    def stream_id(self) -> int:  # type: ignore[override]
        return self._devicekit_id

    @property
    def cuda_stream(self) -> int:
        return self._devicekit_id

    @property
    def priority(self) -> int:
        return 0

    def query(self) -> bool:
        self.synchronize()  # the host saw it finished: what it did is done
        return True

    def synchronize(self) -> None:
        races = _simulate_async.active
        if races is not None:
            races.host_waits(_simulate_async.stamp_of(self))

    def wait_event(self, event: torch.Event) -> None:
        races = _simulate_async.active
        if races is not None and isinstance(event, SimulatedEvent):
            races.wait(self, event._devicekit_stamp)

    def wait_stream(self, stream: torch.Stream) -> None:
        races = _simulate_async.active
        if races is not None and isinstance(stream, SimulatedStream):
            races.wait(self, _simulate_async.stamp_of(stream))

    def record_event(self, event: torch.Event | None = None) -> torch.Event:
        if event is None:
            event = SimulatedEvent()
        event.record(self)
        return event

    def is_capturing(self) -> bool:
        return False

    def __enter__(self) -> SimulatedStream:
        session = _session()
        _state().enter(session, self)
        return self

    def __exit__(self, *exc: object) -> None:
        _state().exit(_session())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SimulatedStream):
            return self._devicekit_id == other._devicekit_id
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((self._devicekit_device, self._devicekit_id))

    def __repr__(self) -> str:
        return (
            f"<torch.cuda.Stream device={self._devicekit_device} "
            f"cuda_stream={self._devicekit_id} (simulated)>"
        )


class SimulatedEvent(torch.Event):
    """An event of a simulated device: it has happened as soon as it is recorded."""

    _devicekit_time: float | None
    _devicekit_timing: bool
    _devicekit_device: torch.device | None
    #: What the work before its last `record()` covers (the race finder's vector clock).
    _devicekit_stamp: dict[int, int] | None

    def __new__(
        cls,
        enable_timing: bool = False,
        blocking: bool = False,
        interprocess: bool = False,
        *,
        device: object = None,
        **kwargs: Any,
    ) -> SimulatedEvent:
        session = _session()
        event = torch.Event.__new__(cls, device="cpu")
        event._devicekit_time = None
        event._devicekit_stamp = None
        event._devicekit_timing = bool(enable_timing)
        event._devicekit_device = session.resolve(device) if device is not None else None
        return event

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @property
    def device(self) -> torch.device | None:  # type: ignore[override]
        return self._devicekit_device

    def record(self, stream: torch.Stream | None = None) -> None:
        if stream is not None and isinstance(stream, SimulatedStream):
            self._devicekit_device = stream.device
        elif self._devicekit_device is None:
            session = _session()
            self._devicekit_device = session.device(session.current)
        self._devicekit_time = time.perf_counter()
        if _simulate_async.active is not None:
            if not isinstance(stream, SimulatedStream):
                index = self._devicekit_device.index or 0
                stream = _state().current_of(index)
            self._devicekit_stamp = _simulate_async.stamp_of(stream)

    def wait(self, stream: torch.Stream | None = None) -> None:
        if _simulate_async.active is not None:
            if not isinstance(stream, SimulatedStream):
                device = self._devicekit_device
                index = _session().current if device is None else device.index or 0
                stream = _state().current_of(index)
            stream.wait_event(self)

    def query(self) -> bool:
        self.synchronize()  # the host saw it happen: the work it covers is done
        return True

    def synchronize(self) -> None:
        races = _simulate_async.active
        if races is not None:
            races.host_waits(self._devicekit_stamp)

    def elapsed_time(self, end_event: torch.Event) -> float:
        """Milliseconds of wall-clock time between this event's `record()` and `end_event`'s."""
        if not isinstance(end_event, SimulatedEvent):
            raise TypeError(
                f"elapsed_time(): expected an event of a simulated device, got {end_event!r}."
            )
        if not (self._devicekit_timing and end_event._devicekit_timing):
            raise ValueError("Both events must be created with argument 'enable_timing=True'.")
        if self._devicekit_time is None or end_event._devicekit_time is None:
            raise ValueError("Both events must be recorded before calculating elapsed time.")
        return (end_event._devicekit_time - self._devicekit_time) * 1000.0

    def __repr__(self) -> str:
        return f"<torch.cuda.Event device={self._devicekit_device} (simulated)>"


class Streams:
    """Which stream is current on each simulated device, and the `stream(s)` blocks entered,
    per thread, as CUDA keeps its current streams (a new thread starts on the default ones)."""

    def __init__(self, count: int) -> None:
        self.defaults: list[SimulatedStream | None] = [None] * count
        self._threads = threading.local()

    @property
    def current(self) -> dict[int, SimulatedStream]:
        """The calling thread's current stream of each device it changed."""
        try:
            current: dict[int, SimulatedStream] = self._threads.current
        except AttributeError:
            current = self._threads.current = {}
        return current

    @property
    def entered(self) -> list[tuple[int, int, SimulatedStream | None]]:
        """(device index before, device, its stream before) per block the thread entered."""
        try:
            entered: list[tuple[int, int, SimulatedStream | None]] = self._threads.entered
        except AttributeError:
            entered = self._threads.entered = []
        return entered

    def default(self, index: int) -> SimulatedStream:
        stream = self.defaults[index]
        if stream is None:
            session = _session()
            stream = SimulatedStream(session.device(index))
            self.defaults[index] = stream
            races = _simulate_async.active
            if races is not None:
                races.default_stream_made(stream)
        return stream

    def synchronize(self, index: int) -> None:
        """`torch.cuda.synchronize(index)`: the host waits for all work of the device."""
        races = _simulate_async.active
        if races is not None:
            races.host_waits(None, device=index)

    def current_of(self, index: int) -> SimulatedStream:
        return self.current.get(index) or self.default(index)

    def set(self, stream: SimulatedStream) -> None:
        self.current[stream.device_index] = stream

    def enter(self, session: Any, stream: SimulatedStream) -> None:
        index = stream.device_index
        self.entered.append((session.current, index, self.current.get(index)))
        session.current = index
        self.current[index] = stream

    def exit(self, session: Any) -> None:
        previous, index, stream = self.entered.pop()
        if stream is None:
            self.current.pop(index, None)
        else:
            self.current[index] = stream
        session.current = previous
