"""`colocate()` and `@colocated`: put everything a computation needs on one device.

The device is chosen as `device_guard("move")` chooses it: the explicit `device`, else the
innermost `default_device`, else the one non-CPU device the tensors are on; with tensors on two
accelerators and no device given there is no right answer, and `CrossDeviceError` says so. The
moving itself is `devicekit.to_device`'s, so every structure it accepts works here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, overload

import torch
from typing_extensions import ParamSpec, TypeVarTuple, Unpack

from devicekit._errors import CrossDeviceError
from devicekit._guard import _ACTIVE_GUARD, choose_device
from devicekit._move import to_device
from devicekit._paths import devices_in, render, walk
from devicekit._report import Report
from devicekit._resolve import resolve
from devicekit._scope import wrap
from devicekit._types import DeviceLike

__all__ = ["colocate", "colocated"]

P = ParamSpec("P")
R = TypeVar("R")
Ts = TypeVarTuple("Ts")


def _choose_target(
    operation: str, labelled: list[tuple[str, object]], device: DeviceLike
) -> torch.device | None:
    __tracebackhide__ = True
    explicit = None if device is None else resolve(device, operation=operation)
    if explicit is not None:
        return explicit
    found = devices_in(labelled)
    target = choose_device(found, None)
    if target is None and found:
        raise _ambiguous(operation, labelled, found)
    return target


#: The most tensors per device that the error lists by path (a model has thousands).
_SHOWN = 3


def _ambiguous(
    operation: str,
    labelled: list[tuple[str, object]],
    found: Mapping[torch.device, Sequence[str]],
) -> CrossDeviceError:
    """The error for tensors on two accelerators or more: each tensor described as the guard
    and the simulation describe operands, with where it came from inside either of them."""
    __tracebackhide__ = True
    shown: dict[torch.device, list[tuple[str, torch.Tensor | str]]] = {d: [] for d in found}
    for label, obj in labelled:
        for value, where in walk(obj):
            if isinstance(value, torch.Tensor) and value.device in shown:
                listed = shown[value.device]
                if len(listed) < _SHOWN:
                    listed.append((render(label, where), value))
    operands: list[tuple[str, torch.Tensor | str]] = []
    for device, listed in shown.items():
        operands.extend(listed)
        if len(found[device]) > len(listed):
            operands.append(("", f"and {len(found[device]) - len(listed)} more on {device}"))
    report = Report(operation, operands, devices=list(found), target=None, block=_block())
    first = next(iter(found))
    return report.error(
        fix=f'Fix: name the device, e.g. `{operation}(..., device="{first}")`: with tensors on '
        "several accelerators there is no one device to move them to."
    )


def _block() -> str:
    """Which check is active, for the operands' provenance: a simulation, a guard, or none
    (`"colocate"`: nothing was recorded, no provenance is looked up)."""
    from devicekit import _simulate_mode

    if _simulate_mode._active is not None:
        return "simulated_devices"
    return "device_guard" if _ACTIVE_GUARD.get() is not None else "colocate"


def colocate(*objs: Unpack[Ts], device: DeviceLike = None) -> tuple[Unpack[Ts]]:
    """Return `objs` moved to one device, as a tuple in the same order.

    Each object may be anything `devicekit.to_device` moves: tensors, modules, nested batches.
    The device is `device` if given, else the innermost `default_device`, else the one non-CPU
    device the tensors are on (objects already there come back unchanged, as the same objects);
    with no tensors at all, the objects come back as they are.

    Args:
        *objs: The objects to co-locate.
        device: Where to put them; `None` to choose by the rule above.

    Returns:
        The moved objects, always as a tuple (`x, = colocate(x)` for one).

    Raises:
        CrossDeviceError: No `device` was given and the tensors are on two accelerators or more.

    Example:
        >>> import torch, devicekit
        >>> x, w = devicekit.colocate(torch.ones(2), torch.ones(2, device="meta"))
        >>> x.device, w.device
        (device(type='meta'), device(type='meta'))
    """
    __tracebackhide__ = True  # pytest shows the user's line, not devicekit's internals
    values: tuple[object, ...] = objs
    labelled = [(f"objs[{index}]", obj) for index, obj in enumerate(values)]
    target = _choose_target("colocate", labelled, device)
    if target is None:
        return objs
    return tuple(to_device(obj, target) for obj in values)  # type: ignore[return-value]


@overload
def colocated(function: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def colocated(*, device: DeviceLike = None) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def colocated(
    function: Callable[P, R] | None = None, /, *, device: DeviceLike = None
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so that every call first moves all its arguments to one device.

    The device is chosen per call as `colocate` chooses it, over all arguments together; works
    with and without parentheses, and on coroutine functions.

    Args:
        function: The function, when used as `@colocated` without parentheses.
        device: Where to put the arguments; `None` to choose per call.

    Example:
        >>> import torch, devicekit
        >>> @devicekit.colocated
        ... def affine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ...     return x @ w
        >>> affine(torch.ones(2, 3), torch.ones(3, 4, device="meta")).device
        device(type='meta')
    """
    if function is None:
        return functools.partial(_colocated, device=device)
    return _colocated(function, device=device)


def _colocated(function: Callable[P, R], *, device: DeviceLike) -> Callable[P, R]:
    signature = _signature(function)
    operation = getattr(function, "__qualname__", "colocated")

    def moved(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        __tracebackhide__ = True
        labelled = _labels(signature, args, kwargs)
        target = _choose_target(f"@colocated {operation}", labelled, device)
        if target is None:
            return args, kwargs
        return to_device(args, target), to_device(kwargs, target)

    return wrap(function, arguments=moved)  # plain and async, as every scoped decorator


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def _labels(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, object]]:
    """Each argument with its parameter name where the signature tells it."""
    names: list[str] = []
    if signature is not None:
        for param in signature.parameters.values():
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                names.append(param.name)
    labelled: list[tuple[str, object]] = [
        (names[index] if index < len(names) else f"args[{index}]", value)
        for index, value in enumerate(args)
    ]
    labelled += list(kwargs.items())
    return labelled
