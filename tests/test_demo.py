from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicekit
from devicekit import _demo
from devicekit._cli import _parser, main
from devicekit._demo import batches, spirals, train
from tests.machine import REAL_CUDA


@settings(max_examples=25)
@given(st.integers(1, 50), st.integers(2, 5), st.integers(0, 2**16))
def test_spirals_are_balanced_bounded_and_seeded(
    points_per_class: int, classes: int, seed: int
) -> None:
    points, labels = spirals(points_per_class, classes=classes, seed=seed)
    assert points.shape == (points_per_class * classes, 2)
    assert points.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=classes).tolist() == [points_per_class] * classes
    assert bool((points.norm(dim=1) <= 1 + 1e-6).all())  # radius grows from 0 to 1
    again_points, again_labels = spirals(points_per_class, classes=classes, seed=seed)
    assert torch.equal(points, again_points)
    assert torch.equal(labels, again_labels)


@settings(max_examples=25)
@given(st.integers(1, 200), st.integers(1, 64))
def test_batches_cover_every_point_once_per_epoch(size: int, batch_size: int) -> None:
    points = torch.arange(size, dtype=torch.float32).unsqueeze(1).expand(size, 2)
    labels = torch.arange(size)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for batch in batches(points, labels, batch_size, generator):
        assert set(batch) == {"points", "labels"}
        assert len(batch["labels"]) <= batch_size
        assert torch.equal(batch["points"][:, 0].long(), batch["labels"])  # rows stay paired
        seen += batch["labels"].tolist()
    assert sorted(seen) == list(range(size))


def test_default_run_reaches_the_stated_accuracy() -> None:
    lines: list[str] = []
    result = train("cpu", log=lines.append)
    assert result.accuracy >= _demo.TARGET_ACCURACY
    assert result.device == torch.device("cpu")
    assert (result.train_size, result.test_size) == (2400, 600)
    assert len(result.epochs) == _demo.DEFAULT_EPOCHS
    assert result.epochs[-1].steps == _demo.DEFAULT_EPOCHS * 38  # ceil(2400 / 64) per epoch
    assert result.epochs[-1].loss < result.epochs[0].loss / 5
    assert lines[0] == (
        "devicekit demo: 3-class interleaved spirals, 2,400 training and 600 held-out points; "
        "an MLP with 8,707 parameters on cpu (1 thread), 10 epochs of batches of 64."
    )
    assert len(lines) == 1 + _demo.DEFAULT_EPOCHS


def test_train_restores_the_thread_count_and_the_default_device() -> None:
    threads = torch.get_num_threads()
    train("cpu", epochs=1, batch_size=512, log=lambda line: None)
    assert torch.get_num_threads() == threads
    assert torch.get_default_device() == torch.device("cpu")


@pytest.mark.skipif(REAL_CUDA, reason="simulation is refused where CUDA is real")
def test_the_guard_is_active_during_training(monkeypatch: pytest.MonkeyPatch) -> None:
    # Plant the bug the demo guards against: batches that are never moved to the model's device.
    monkeypatch.setattr(_demo, "to_device", lambda batch, *args, **kwargs: batch)
    with devicekit.simulated_devices("cuda", 1), pytest.raises(devicekit.CrossDeviceError):
        train("cuda:0", epochs=1, log=lambda line: None)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")], ids=["str", "torch.device"])
def test_a_device_without_values_is_refused_before_training(
    device: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_demo, "spirals", lambda **kwargs: pytest.fail("trained on meta"))
    with pytest.raises(devicekit.InvalidArgumentError) as raised:
        train(device, log=lambda line: None)  # type: ignore[arg-type]
    assert str(raised.value) == (
        f"train({device!r}): the demo trains a model and reports its loss and accuracy, which "
        "needs a device that computes values; meta tensors have shapes but no values. Use cpu, "
        "auto, or an accelerator such as cuda:0."
    )


def test_cli_demo_on_meta_exits_2_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "meta"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("devicekit demo: error: train('meta'): the demo trains")


def test_cli_demo_prints_report_progress_and_accuracy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--device", "cpu", "--epochs", "2", "--batch-size", "128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("devicekit device report (python ")
    assert "--device 'cpu' resolves to cpu." in out
    progress = re.findall(
        r"^epoch (\d)/2  steps +(\d+)  loss (\d+\.\d{4}) +[\d,]+ samples/s$", out, re.M
    )
    assert [(epoch, steps) for epoch, steps, _ in progress] == [("1", "19"), ("2", "38")]
    assert re.search(
        r"^accuracy on 600 held-out points: \d+\.\d% \(with other settings than the defaults; "
        r"the default run reaches at least 95%\)$",
        out,
        re.M,
    )


def test_cli_demo_bad_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cuda:x"]) == 2
    assert capsys.readouterr().err.startswith(
        "devicekit demo: error: as_device('cuda:x'): not a device spec."
    )


def test_cli_defaults_are_the_demo_defaults() -> None:
    args: Any = _parser().parse_args(["demo"])
    assert (args.demo_device, args.epochs, args.batch_size) == (
        "auto",
        _demo.DEFAULT_EPOCHS,
        _demo.DEFAULT_BATCH_SIZE,
    )


def test_demo_on_a_simulated_gpu_matches_the_cpu() -> None:
    cpu = train("cpu", epochs=1, batch_size=600, log=lambda line: None)
    with devicekit.simulated_devices("cuda", 2):
        gpu = train("cuda:1", epochs=1, batch_size=600, log=lambda line: None)
    assert gpu.device == torch.device("cuda", 1)
    assert [round(e.loss, 5) for e in gpu.epochs] == [round(e.loss, 5) for e in cpu.epochs]
    assert gpu.accuracy == pytest.approx(cpu.accuracy)
