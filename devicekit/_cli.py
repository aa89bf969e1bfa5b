"""`python -m devicekit`: the device report, and the `demo`, `bench` and `audit` subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from devicekit import _nvml
from devicekit._context import as_device
from devicekit._discovery import DeviceInfo, _gib, accelerator_type, devices
from devicekit._errors import DevicekitError, InvalidArgumentError
from devicekit._resolve import explain_best_device

__all__ = ["main", "print_report"]


def _gib_or_dash(size: int | None) -> str:
    return "-" if size is None else _gib(size)


def _versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "driver": _nvml.driver_version(),
    }


def _report(device_spec: str | None) -> dict[str, Any]:
    auto, reason = explain_best_device()
    report: dict[str, Any] = {
        "versions": _versions(),
        "devices": [_as_json(info) for info in devices(initialize=True)],
        "auto": {"device": str(auto), "reason": reason},
    }
    if device_spec is not None:
        report["requested"] = {"spec": device_spec, "device": str(as_device(device_spec))}
    return report


def _as_json(info: DeviceInfo) -> dict[str, Any]:
    return {
        "device": str(info.device),
        "name": info.name,
        "total_memory": info.total_memory,
        "free_memory": info.free_memory,
        "capability": None if info.capability is None else ".".join(map(str, info.capability)),
        "simulated": info.simulated,
    }


def _print_table(report: dict[str, Any]) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None)
    print(f"devicekit device report ({versions})")
    rows = [("device", "name", "total", "free", "capability")]
    for entry in report["devices"]:
        name = entry["name"] + (" [simulated]" if entry["simulated"] else "")
        rows.append(
            (
                entry["device"],
                name,
                _gib_or_dash(entry["total_memory"]),
                _gib_or_dash(entry["free_memory"]),
                entry["capability"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  "
            + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    auto = report["auto"]
    print(f"'auto' resolves to {auto['device']}: {auto['reason']}.")
    if "requested" in report:
        requested = report["requested"]
        print(f"--device {requested['spec']!r} resolves to {requested['device']}.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devicekit",
        description="Report the devices torch can use on this machine (the default), "
        "train a small model end to end (demo), time CPU against accelerators (bench), or "
        "find device bugs in a model without running it (audit).",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--device", help="also resolve this device spec (e.g. 'cuda:1', 'auto')")
    commands = parser.add_subparsers(dest="command", metavar="{demo,bench,audit}")
    demo = commands.add_parser(
        "demo",
        help="train a small classifier on generated spirals with devicekit",
        description="Train a small classifier on generated interleaved spirals the way a "
        "devicekit user would: the model built under default_device, batches moved with "
        "to_device, every step checked by device_guard('error').",
    )
    demo.add_argument(
        "--device", dest="demo_device", default="auto", help="where to train (default: auto)"
    )
    demo.add_argument(
        "--epochs", type=_positive, default=10, help="passes over the data (default: 10)"
    )
    demo.add_argument(
        "--batch-size", type=_positive, default=64, help="points per batch (default: 64)"
    )
    bench = commands.add_parser(
        "bench",
        help="time element-wise ops and matmuls of growing size on each device",
        description="Time element-wise operations and matrix products of growing size on "
        "every device torch can use, count transfers separately, and show where each "
        "accelerator overtakes the CPU.",
    )
    bench.add_argument("--plot", metavar="FILE.png", help="also draw the curves (matplotlib)")
    bench.add_argument(
        "--repeat", type=_positive, default=5, help="timed batches per point (default: 5)"
    )
    bench.add_argument(
        "--cpu-threads",
        type=_positive,
        metavar="N",
        help="threads for the CPU's operations (default: torch's, usually one per core)",
    )
    audit = commands.add_parser(
        "audit",
        help="find device bugs in a model without running it",
        description="Import a model and audit it with devicekit.audit: tensors that "
        "Module.to() does not move, modules held in plain lists, split ties, parameters on "
        "several devices. Nothing runs. Exits with 1 when it finds errors or warnings.",
    )
    audit.add_argument(
        "target",
        metavar="MODULE:ATTRIBUTE",
        help="where the model is: a module instance, or a class or function that builds one "
        "with no arguments (e.g. mypackage.models:build_model, or models.py:Model)",
    )
    audit.add_argument(
        "--name", default="model", help="what to call the model in paths (default: model)"
    )
    audit.add_argument(
        "--info",
        action="store_true",
        help="also list what is not a bug by itself (non-persistent buffers)",
    )
    audit.add_argument(
        "--json",
        dest="audit_json",
        action="store_true",
        help="print the findings as JSON (a list of objects with path, kind, message, fix and "
        "severity)",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def print_report(device_spec: str | None = None) -> None:
    """Print the device report (and what `device_spec` resolves to) as a table."""
    _print_table(_report(device_spec))


def _run_report(args: argparse.Namespace) -> int:
    report = _report(args.device)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from devicekit import _demo

    device = _demo.computing_device(args.demo_device)  # before the report, not after it
    print_report(None if args.demo_device == "auto" else str(args.demo_device))
    print()
    result = _demo.train(device, epochs=args.epochs, batch_size=args.batch_size)
    print(_demo.summary(result, epochs=args.epochs, batch_size=args.batch_size))
    return 0


def _plot_problem(path: str) -> str | None:
    """Why `--plot path` could not be written, checked before minutes of measuring; else `None`."""
    try:
        import matplotlib  # noqa: F401  (an optional dependency: the `plot` extra)
        from matplotlib.figure import Figure
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed. Install it with "
            "`pip install 'devicekit[plot]'` (or `pip install matplotlib`), or run without --plot."
        )
    suffix = Path(path).suffix.lstrip(".").lower()
    formats = Figure().canvas.get_supported_filetypes()
    if suffix and suffix not in formats:
        return (
            f"--plot {path}: matplotlib cannot write .{suffix} files. "
            f"Use one of {', '.join('.' + name for name in sorted(formats))}, such as bench.png."
        )
    target = Path(path)
    existed = target.exists()
    try:
        with target.open("ab"):
            pass
    except OSError as error:
        return f"--plot {path}: cannot write there ({error.strerror}). Choose a writable path."
    if not existed:
        target.unlink()
    return None


def _run_bench(args: argparse.Namespace) -> int:
    from devicekit import _bench

    if args.plot is not None:
        problem = _plot_problem(args.plot)
        if problem is not None:
            print(f"devicekit bench: error: {problem}", file=sys.stderr)
            return 2
    if accelerator_type() is None:
        print(
            "devicekit bench: this machine has no accelerator that torch can use "
            f"(torch {torch.__version__}); measuring the CPU curve only.",
            flush=True,
        )
    threads = torch.get_num_threads()
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    try:
        _print_bench_setting(torch.get_num_threads())
        results = _bench.run(
            repeat=args.repeat,
            progress=lambda point: print(".", end="", flush=True),
        )
    finally:
        torch.set_num_threads(threads)
    print()
    print(_bench.format_report(results, repeat=args.repeat))
    if args.plot is not None:
        _bench.plot(results, args.plot)
        print(f"Plot written to {args.plot}.")
    return 0


def _load_target(target: str) -> Any:
    """The object `MODULE:ATTRIBUTE` (or `FILE.py:ATTRIBUTE`) names, built when it is a class
    or factory."""
    module_name, colon, attribute = target.rpartition(":")
    if not colon or not module_name or not attribute:
        raise InvalidArgumentError(
            f"{target!r}: expected MODULE:ATTRIBUTE, such as mypackage.models:build_model or "
            "models.py:Model (a module instance, or a class or function that builds one with no "
            "arguments)."
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current directory
    try:
        value: Any = _import(module_name)
    except Exception as error:
        raise InvalidArgumentError(
            f"{target!r}: cannot import {module_name!r}: {type(error).__name__}: {error}"
        ) from error
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError as error:
            raise InvalidArgumentError(
                f"{target!r}: {module_name} has no attribute {attribute!r}."
            ) from error
    if isinstance(value, torch.nn.Module) or not callable(value):
        return value
    try:
        return value()
    except Exception as error:
        raise InvalidArgumentError(
            f"{target!r}: calling {attribute}() to build the model raised "
            f"{type(error).__name__}: {error}"
        ) from error


def _import(module_name: str) -> Any:
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"no Python file {module_name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: classes pickle, dataclasses resolve
    spec.loader.exec_module(module)
    return module


def _run_audit(args: argparse.Namespace) -> int:
    from devicekit._audit import audit

    report = audit(_load_target(args.target), name=args.name, info=args.info)
    if args.audit_json:
        print(json.dumps([dataclasses.asdict(finding) for finding in report], indent=2))
    else:
        print(report.format())
    return 1 if report.at_least("warning") else 0


def _print_bench_setting(threads: int) -> None:
    cores = os.cpu_count() or 1
    print(f"The CPU runs each operation on {threads} thread(s); this machine has {cores} core(s).")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= 0.5 * cores:
        advice = "rerun when it is idle" + (", or with --cpu-threads 1" if threads > 1 else "")
        print(
            f"The machine is busy (load average {load:.1f} for {cores} cores): CPU timings that "
            "jump to milliseconds mean other processes hold the cores the CPU's threads wait "
            f"for; {advice}.",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    devicekit's own errors (a bad `--device` or `DEVICEKIT_DEVICE`, say) print one
    `devicekit: error: ...` message and exit with status 2, as argparse does for bad options.
    `devicekit audit` exits with 1 when the audit finds errors or warnings, 0 when it finds none.
    A reader that stops early (`devicekit --json | head -c 5`) ends the command quietly.
    """
    args = _parser().parse_args(argv)
    command = {"demo": _run_demo, "bench": _run_bench, "audit": _run_audit}.get(
        args.command, _run_report
    )
    name = "devicekit" if args.command is None else f"devicekit {args.command}"
    try:
        status = command(args)
        sys.stdout.flush()  # a closed pipe raises here, not at exit
    except DevicekitError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _discard_stdout()
        return 1
    return status


def _discard_stdout() -> None:
    """After the reader of stdout went away: point stdout at devnull, so that Python's flush at
    exit raises no second `BrokenPipeError` (the recipe of the `signal` module's docs)."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured by a test, say): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)
