"""`python -m devicekit`: the device report."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

from devicekit import _nvml
from devicekit._discovery import DeviceInfo, as_device, devices, explain_best_device
from devicekit._errors import DevicekitError

__all__ = ["main"]


def _gib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**30:.1f} GiB"


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
                _gib(entry["total_memory"]),
                _gib(entry["free_memory"]),
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
        prog="devicekit", description="Report the devices torch can use on this machine."
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--device", help="also resolve this device spec (e.g. 'cuda:1', 'auto')")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        report = _report(args.device)
    except DevicekitError as error:
        print(f"devicekit: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0
