"""The torch attributes a simulation replaces while it is active: `torch.cuda.*` (or the
simulated type's module), `torch.accelerator`, `torch.Event`/`torch.Stream`, pinning, and
`Parameter.__new__`; with the fake streams and events they hand out.

Every replacement that may be captured by a library imported during the simulation (TorchDynamo
builds tables of torch functions on import) answers for the simulation only while its session
is the active one, and calls the original otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable
from typing import Any

import torch

from devicekit import _simulate_mode, _simulate_parallel
from devicekit._errors import SimulationError
from devicekit._simulate_mode import _Session, _set_tag, _simulated

__all__ = ["_patches"]


class _FakeEvent:
    """An event on a simulated device: work on the CPU is done when it returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: object = None) -> None:
        return None

    def wait(self, stream: object = None) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class _FakeStream:
    """A stream on a simulated device: everything already ran, in order, on the CPU."""

    def __init__(self, device: object = None, *args: Any, **kwargs: Any) -> None:
        session = _simulate_mode._active
        self.device = session.resolve(device) if session is not None else None
        if self.device is None and session is not None:
            self.device = session.device(session.current)

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def is_capturing(self) -> bool:
        return False

    def wait_stream(self, stream: object) -> None:
        return None

    def wait_event(self, event: object) -> None:
        return None

    def record_event(self, event: _FakeEvent | None = None) -> _FakeEvent:
        return event if event is not None else _FakeEvent()

    def __enter__(self) -> _FakeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _patches(session: _Session) -> dict[tuple[object, str], object]:
    """Every torch attribute the simulation replaces, with its replacement."""
    kind = session.type
    module = getattr(torch, kind)

    def index_of(device: object = None) -> int:
        if device is None:
            return session.current
        if isinstance(device, int):
            resolved = session.resolve(device)
        else:
            resolved = session.resolve(getattr(device, "device", device))
        if resolved is None or resolved.index is None:
            raise SimulationError(f"{device!r} is not a simulated {kind} device")
        return resolved.index

    def set_device(device: object) -> None:
        session.current = index_of(device)

    def exchange(device: int) -> int:
        previous = session.current
        if device >= 0:
            session.current = index_of(device)
        return previous

    def synchronize(device: object = None) -> None:
        index_of(device)

    def device_name(device: object = None) -> str:
        return f"simulated {kind}:{index_of(device)}"

    def generic(original: Callable[..., Any], fake: Callable[..., Any]) -> Callable[..., Any]:
        """`torch.Event`/`torch.Stream`: fakes for simulated devices, real ones otherwise."""

        def make(*args: Any, **kwargs: Any) -> Any:
            device = kwargs.get("device", args[0] if args else None)
            if device is None or session.resolve(device) is not None:
                return fake(device)
            return original(*args, **kwargs)

        return make

    accelerator = torch.accelerator
    patches: dict[tuple[object, str], object] = {
        (torch, "Event"): generic(torch.Event, _FakeEvent),
        (torch, "Stream"): generic(torch.Stream, _FakeStream),
        (accelerator, "current_accelerator"): lambda check_available=False: torch.device(kind),
        (accelerator, "device_count"): lambda: session.count,
        (accelerator, "is_available"): lambda: True,
        (accelerator, "current_device_index"): lambda: session.current,
        (accelerator, "set_device_index"): set_device,
        (accelerator, "synchronize"): synchronize,
        (accelerator, "current_stream"): lambda device=None: _FakeStream(device),
    }
    for name, value in (
        ("is_available", lambda: True),
        ("device_count", lambda: session.count),
        ("current_device", lambda: session.current),
        ("set_device", set_device),
        ("synchronize", synchronize),
        ("current_stream", lambda device=None: _FakeStream(device)),
        ("default_stream", lambda device=None: _FakeStream(device)),
        ("Stream", _FakeStream),
        ("Event", _FakeEvent),
        ("stream", lambda stream: stream if stream is not None else contextlib.nullcontext()),
        ("set_stream", lambda stream: None),
        ("get_device_name", device_name),
        ("_exchange_device", exchange),
        ("_maybe_exchange_device", exchange),
    ):
        if hasattr(module, name):
            patches[(module, name)] = value
    if kind == "cuda":
        patches[(torch.backends.cudnn, "is_acceptable")] = lambda tensor: False
    # Pinning (also in a DataLoader's pin-memory thread), subclasses, vmap: `_simulate_mode`.
    patches.update(_simulate_mode.tensor_patches(session))
    for cls in (torch.nn.Parameter, torch.nn.Buffer):
        patches[(cls, "__new__")] = staticmethod(_keeping_tag(cls.__dict__["__new__"]))
    patches.update(_simulate_parallel.patches(kind))  # nn.parallel.comm: DataParallel, replicate
    return {
        (owner, name): _while_active(session, owner.__dict__.get(name), value)
        for (owner, name), value in patches.items()
    }


def _while_active(session: _Session, original: object, fake: object) -> object:
    """`fake` while `session` is the active simulation, `original` at any other time.

    A library imported inside the block may keep a reference to the fake for good (TorchDynamo
    builds tables of torch functions on import); after the block such a reference behaves as
    the original did.
    """
    if not isinstance(fake, types.FunctionType) or not callable(original):
        return fake
    answer: Callable[..., Any] = fake
    real: Callable[..., Any] = original

    def switch(*args: Any, **kwargs: Any) -> Any:
        if _simulate_mode._active is session:
            return answer(*args, **kwargs)
        return real(*args, **kwargs)

    return functools.update_wrapper(switch, real, updated=())


def _pinned_copy(tensor: torch.Tensor, device: object = None) -> torch.Tensor:
    """`Tensor.pin_memory` while simulating: a copy, since a CPU build has no pinned memory."""
    return torch.Tensor.clone(tensor)


def _keeping_tag(new: Any) -> Callable[..., Any]:
    """Wrap `Parameter.__new__`: the new parameter is where its data is."""
    function = new.__func__ if isinstance(new, staticmethod) else new

    @functools.wraps(function)
    def wrapper(cls: type, data: Any = None, *args: Any, **kwargs: Any) -> Any:
        made = function(cls, data, *args, **kwargs)
        if isinstance(data, torch.Tensor) and made is not data:
            _set_tag(made, _simulated(data))
        return made

    return wrapper
