"""Child processes inherit a simulation, the way coverage.py measures subprocesses.

Entering `simulated_devices("cuda", 2)` sets `DEVICEKIT_SIMULATE=cuda:2` (leaving restores the
previous value). The one-line `devicekit_simulate.pth` that installing devicekit puts in
site-packages runs at every interpreter start-up and, only when that variable is set, imports
this module and calls `install()`; without the variable it costs one dictionary lookup. `install`
waits for `import torch` (most children never import it, and should not pay for it) and enters
the simulation as soon as torch has been imported, for the rest of the process. So
`subprocess.run([sys.executable, "train.py"])`, `multiprocessing` and `torch.multiprocessing`
children (spawn, forkserver), DataLoader workers and `torchrun` ranks all run simulated; forked
children are simulated already, being copies of their parent.

Tensors sent to another process through `multiprocessing` (a hogwild model, a queue) keep their
simulated device: while a simulation is active the tensor reducer of `ForkingPickler` records it,
and the receiving process tags the rebuilt tensor again, or raises `SimulationError` when it
does not simulate that device.

This module imports neither torch nor the rest of devicekit until it has to.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from devicekit._simulate import simulated_devices
    from devicekit._simulate_mode import _Session

__all__ = ["ENVIRONMENT_VARIABLE", "install", "process_patches"]

#: Set while a simulation is active; read by the start-up hook of every new Python process.
ENVIRONMENT_VARIABLE = "DEVICEKIT_SIMULATE"
#: The file installing devicekit puts in site-packages (see `pyproject.toml`).
PTH_NAME = "devicekit_simulate.pth"


def _parse(value: str) -> tuple[str, int, dict[str, Any]]:
    """`DEVICEKIT_SIMULATE`'s `TYPE:COUNT` (or `TYPE`, 2 devices) and the device facts after
    it (`;memory=BYTES;capability=MAJOR.MINOR;name=NAME`); `SimulationError` if malformed."""
    from devicekit._errors import SimulationError

    head, named, name = value.strip().partition(";name=")  # the name is last: it may hold ";"
    devices, *settings = head.split(";")
    kind, colon, count = devices.partition(":")
    facts: dict[str, Any] = {"name": name} if named else {}
    valid = bool(kind) and (count.isdigit() if colon else True) and len(count) <= 3
    for setting in settings:
        key, _, text = setting.partition("=")
        if key == "memory" and text.isdigit():
            facts["memory"] = int(text)
        elif key == "capability" and all(part.isdigit() for part in text.split(".", 1)):
            major, _, minor = text.partition(".")
            facts["capability"] = (int(major), int(minor or 0))
        else:
            valid = False
    if valid:
        return kind, int(count or 2), facts
    raise SimulationError(
        f"{ENVIRONMENT_VARIABLE}={value!r}: this process (pid {os.getpid()}, started by a "
        "simulating parent) cannot enter the simulation: expected TYPE:COUNT, such as cuda:2, "
        "optionally followed by ;memory=BYTES;capability=MAJOR.MINOR;name=NAME. "
        f"Unset {ENVIRONMENT_VARIABLE} to run without a simulation."
    )


def _leave(block: simulated_devices) -> None:
    from devicekit._errors import ScopeError

    # ScopeError: the process already left it (or another one is on top): nothing to undo.
    with contextlib.suppress(ScopeError):
        block.__exit__(None, None, None)


def enter_inherited() -> None:
    """Enter the simulation `DEVICEKIT_SIMULATE` names, for the rest of this process."""
    from devicekit._simulate import simulated_devices

    value = os.environ.get(ENVIRONMENT_VARIABLE, "")
    kind, count, facts = _parse(value)
    try:
        block = simulated_devices(kind, count, **facts)
        block.__enter__()
    except Exception as error:
        from devicekit._errors import SimulationError

        raise SimulationError(
            f"{ENVIRONMENT_VARIABLE}={value!r}: this process (pid {os.getpid()}, started by a "
            f"simulating parent) cannot enter the simulation: {error}"
        ) from error
    atexit.register(_leave, block)


class _EnterAfterImport(importlib.abc.Loader):
    """Runs torch's own loader, then enters the inherited simulation."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        enter_inherited()

    def __getattr__(self, name: str) -> Any:  # resource readers, get_code, is_package ...
        return getattr(self.loader, name)


class _WaitForTorch(importlib.abc.MetaPathFinder):
    """Finds `torch` as the other finders do, with a loader that enters the simulation."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec: importlib.machinery.ModuleSpec | None = (
                None if find is None else find(fullname, path, target)
            )
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _EnterAfterImport(spec.loader)
                return spec
        return None


def install() -> None:
    """Called by `devicekit_simulate.pth` when `DEVICEKIT_SIMULATE` is set: enter the
    simulation once torch is imported (now, if it already is)."""
    if "torch" in sys.modules:
        enter_inherited()
    elif not any(isinstance(finder, _WaitForTorch) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WaitForTorch())


def hook_installed() -> bool:
    """Whether this interpreter's site-packages hold the start-up hook (`PTH_NAME`)."""
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return any(os.path.exists(os.path.join(folder, PTH_NAME)) for folder in folders)


# --- tensors sent to other processes --------------------------------------------------------------


def _rebuild_simulated(
    device: str, rebuild: Callable[..., torch.Tensor], args: tuple[Any, ...]
) -> torch.Tensor:
    """Rebuild a tensor another process sent, on the simulated `device` it had there."""
    import torch

    from devicekit import _simulate_mode
    from devicekit._errors import SimulationError

    tensor = rebuild(*args)
    session = _simulate_mode._active
    target = torch.device(device)
    if session is None or session.type != target.type or (target.index or 0) >= session.count:
        raise SimulationError(
            f"A tensor on the simulated device {device} was sent to process {os.getpid()}, "
            f"which does not simulate {device}. Start the process from inside the simulation "
            f"(it inherits {ENVIRONMENT_VARIABLE}), with the devicekit_simulate.pth start-up hook "
            "installed (`pip install devicekit`, or `pip install -e .` in a checkout)."
        )
    _simulate_mode._set_tag(tensor, target)
    return tensor


def process_patches(session: _Session) -> dict[tuple[object, str], object]:
    """What to replace while `session` is active so that tensors keep their simulated device
    when `multiprocessing` pickles them for another process."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # registers torch's reducers (torch imports it too)

    from devicekit import _simulate_mode

    reducers: dict[type, Callable[..., Any]] = dict(ForkingPickler._extra_reducers)  # type: ignore[attr-defined]

    def simulated(reduce: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def reduce_simulated(tensor: torch.Tensor) -> Any:
            reduced = reduce(tensor)
            device = _simulate_mode._simulated(tensor)
            if device is None:
                return reduced
            rebuild, args = reduced
            return _rebuild_simulated, (str(device), rebuild, args)

        return reduce_simulated

    for kind in (torch.Tensor, torch.nn.Parameter):
        if kind in reducers:
            reducers[kind] = simulated(reducers[kind])
    assert torch.multiprocessing  # imported for its registrations
    return {(ForkingPickler, "_extra_reducers"): reducers}
