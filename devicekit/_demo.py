"""`devicekit demo`: train a small classifier end to end, the way a devicekit user would.

The data is generated (interleaved spirals, nothing is downloaded) on the host, as a DataLoader
would deliver it. The model is built inside `default_device`, every batch is moved with
`to_device`, and every step runs under `device_guard("error")`, so a tensor left on the wrong
device stops the demo with devicekit's message instead of a slow or silent mistake.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from devicekit._context import as_device, current_device, default_device
from devicekit._errors import InvalidArgumentError
from devicekit._guard import device_guard
from devicekit._move import to_device
from devicekit._types import DeviceLike

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "TARGET_ACCURACY",
    "DemoResult",
    "EpochStats",
    "SpiralClassifier",
    "batches",
    "computing_device",
    "spirals",
    "summary",
    "train",
]

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
#: The held-out accuracy the default run reaches (it reaches about 99% in practice).
TARGET_ACCURACY = 0.95
_CLASSES = 3
_POINTS_PER_CLASS = 1000
_HELD_OUT = 0.2


def spirals(
    points_per_class: int = _POINTS_PER_CLASS,
    *,
    classes: int = _CLASSES,
    turns: float = 1.25,
    noise: float = 0.15,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved spirals on the host: `classes` arms of `points_per_class` 2-d points each.

    Returns:
        The points, shape `(classes * points_per_class, 2)`, float32, shuffled, and their labels,
        shape `(classes * points_per_class,)`, int64 in `range(classes)`.

    Example:
        >>> from devicekit._demo import spirals
        >>> points, labels = spirals(10)
        >>> points.shape, labels.shape, sorted(set(labels.tolist()))
        (torch.Size([30, 2]), torch.Size([30]), [0, 1, 2])
    """
    cpu = torch.device("cpu")
    generator = torch.Generator(cpu).manual_seed(seed)
    radius = torch.rand(classes, points_per_class, generator=generator, device=cpu)
    offset = torch.arange(classes, device=cpu).unsqueeze(1) * (2 * math.pi / classes)
    jitter = noise * torch.randn(classes, points_per_class, generator=generator, device=cpu)
    angle = radius * (turns * 2 * math.pi) + offset + jitter
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    labels = torch.arange(classes, device=cpu).repeat_interleave(points_per_class)
    order = torch.randperm(classes * points_per_class, generator=generator, device=cpu)
    return points.reshape(-1, 2)[order], labels[order]


class SpiralClassifier(nn.Module):
    """A small MLP: 2-d points in, one logit per class out."""

    def __init__(self, classes: int = _CLASSES, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(2, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.layers(points)  # type: ignore[no-any-return]


def batches(
    points: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled epoch of host batches, `{"points": ..., "labels": ...}`, like a DataLoader."""
    order = torch.randperm(len(points), generator=generator, device=torch.device("cpu"))
    for start in range(0, len(points), batch_size):
        chosen = order[start : start + batch_size]
        yield {"points": points[chosen], "labels": labels[chosen]}


@dataclass(frozen=True)
class EpochStats:
    """One epoch of training: its number, steps so far, mean loss, and throughput."""

    epoch: int
    steps: int
    loss: float
    samples_per_s: float


@dataclass(frozen=True)
class DemoResult:
    """What a demo run did: where it trained, each epoch, and the held-out accuracy."""

    device: torch.device
    parameters: int
    train_size: int
    test_size: int
    epochs: list[EpochStats]
    accuracy: float


def _format_epoch(stats: EpochStats, epochs: int) -> str:
    width = len(str(epochs))
    return (
        f"epoch {stats.epoch:>{width}}/{epochs}  steps {stats.steps:>5}  "
        f"loss {stats.loss:.4f}  {stats.samples_per_s:>9,.0f} samples/s"
    )


def computing_device(device: DeviceLike = "auto") -> torch.device:
    """The device `device` names, checked to be one the demo can train on.

    Raises:
        InvalidArgumentError: `device` is `meta` (or resolves to it): meta tensors have shapes
            but no values, so there is no loss to report and no accuracy to measure.
        InvalidDeviceSpecError: `device` is not a device spec.
        DeviceUnavailableError: This machine lacks the device.

    Example:
        >>> from devicekit import InvalidArgumentError
        >>> from devicekit._demo import computing_device
        >>> computing_device("cpu")
        device(type='cpu')
        >>> try:
        ...     computing_device("meta")
        ... except InvalidArgumentError as error:
        ...     print(str(error).split(",")[0])
        train('meta'): the demo trains a model and reports its loss and accuracy
    """
    resolved = as_device(device)
    if resolved.type == "meta":
        raise InvalidArgumentError(
            f"train({device!r}): the demo trains a model and reports its loss and accuracy, "
            f"which needs a device that computes values; {resolved} tensors have shapes but no "
            "values. Use cpu, auto, or an accelerator such as cuda:0."
        )
    return resolved


def train(
    device: DeviceLike = "auto",
    *,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train `SpiralClassifier` on `spirals()` with devicekit, logging one line per epoch.

    Everything runs inside `default_device(device)`: the model is built there, batches move with
    `to_device(batch)` (no device: the current default), and training and evaluation run under
    `device_guard("error")`.

    Raises:
        InvalidArgumentError: `device` computes no values (`meta`); see `computing_device`.
    """
    device = computing_device(device)
    points, labels = spirals(seed=seed)
    threads = torch.get_num_threads()
    try:
        with default_device(device):
            if current_device().type == "cpu":
                # The model is tiny: one thread is as fast, and never waits for a second
                # thread that another process has pushed off its core.
                torch.set_num_threads(1)
            return _train(points, labels, epochs=epochs, batch_size=batch_size, seed=seed, log=log)
    finally:
        torch.set_num_threads(threads)


def _train(
    points: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    log: Callable[[str], None],
) -> DemoResult:
    test_size = int(len(points) * _HELD_OUT)
    train_points, train_labels = points[test_size:], labels[test_size:]
    test_batch = {"points": points[:test_size], "labels": labels[:test_size]}
    generator = torch.Generator(torch.device("cpu")).manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_points) / batch_size)
    torch.manual_seed(seed)
    model = SpiralClassifier()
    target = current_device()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.01, total_steps=epochs * steps_per_epoch
    )
    parameters = sum(p.numel() for p in model.parameters())
    threads = f" ({torch.get_num_threads()} thread)" if target.type == "cpu" else ""
    log(
        f"devicekit demo: {_CLASSES}-class interleaved spirals, {len(train_points):,} "
        f"training and {test_size:,} held-out points; an MLP with {parameters:,} parameters "
        f"on {target}{threads}, {epochs} epochs of batches of {batch_size}."
    )
    history = []
    with device_guard("error"):
        steps = 0
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            total_loss = torch.zeros(())
            for host_batch in batches(train_points, train_labels, batch_size, generator):
                batch = to_device(host_batch)
                loss = nn.functional.cross_entropy(model(batch["points"]), batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
                total_loss += loss.detach() * len(batch["labels"])
                steps += 1
            mean_loss = total_loss.item() / len(train_points)  # one sync per epoch
            elapsed = time.perf_counter() - started
            stats = EpochStats(epoch, steps, mean_loss, len(train_points) / elapsed)
            history.append(stats)
            log(_format_epoch(stats, epochs))
        model.eval()
        with torch.no_grad():
            held_out = to_device(test_batch)
            predicted = model(held_out["points"]).argmax(dim=1)
            accuracy = (predicted == held_out["labels"]).float().mean().item()
    return DemoResult(target, parameters, len(train_points), test_size, history, accuracy)


def summary(result: DemoResult, *, epochs: int, batch_size: int) -> str:
    """The last line of `devicekit demo`: the held-out accuracy, and what to expect of it.

    Example:
        >>> import torch
        >>> from devicekit._demo import DemoResult, summary
        >>> result = DemoResult(torch.device("cpu"), 8707, 2400, 600, [], 0.9912)
        >>> summary(result, epochs=10, batch_size=64)
        'accuracy on 600 held-out points: 99.1% (the default run reaches at least 95%)'
    """
    defaults = epochs == DEFAULT_EPOCHS and batch_size == DEFAULT_BATCH_SIZE
    goal = f"the default run reaches at least {TARGET_ACCURACY:.0%}"
    note = goal if defaults else f"with other settings than the defaults; {goal}"
    return f"accuracy on {result.test_size:,} held-out points: {result.accuracy:.1%} ({note})"
