"""Every benchmark section in one run, recorded in `docs/benchmarks.md`.

    python -m benchmarks.run_all              # run all, print, update docs/benchmarks.md
    python -m benchmarks.run_all --no-write   # run all, print only
    python -m benchmarks.run_all --only bench_transfer

Each module of `MODULES` that exists is imported and its `main()` run with no arguments (a
missing one is reported and skipped). Its printed tables go into `docs/benchmarks.md` between
`<!-- run_all:NAME:start -->` and `<!-- run_all:NAME:end -->`, replacing the previous run's
figures and leaving every hand-written paragraph alone; a section seen for the first time is
appended. With CUDA, the transfer benchmark also draws `docs/transfer-throughput.png`
(throughput against number of tensors) and the section shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import os
import platform
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = DOCS / "benchmarks.md"
PLOT = DOCS / "transfer-throughput.png"
#: The benchmark modules, in the order their sections appear.
MODULES = (
    "bench_to_device",
    "bench_default_device",
    "bench_guard",
    "bench_transfer",
    "bench_simulate",
    "bench_prefetch",
    "bench_materialize",
)


def machine() -> str:
    """One line describing where and when the figures were taken."""
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    accelerator = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    return (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} with {os.cpu_count()} CPUs{load}, {accelerator}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def run_module(name: str, argv: Sequence[str] = ()) -> str | None:
    """Run `benchmarks.NAME.main()` and return what it printed (`None` if there is no NAME)."""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"benchmarks.{name}":
            raise  # the benchmark exists but needs something missing: say so
        return None
    captured = io.StringIO()
    saved = sys.argv
    sys.argv = [f"benchmarks/{name}.py", *argv]
    try:
        with contextlib.redirect_stdout(captured):
            module.main()
    finally:
        sys.argv = saved
    return captured.getvalue()


def section(name: str, output: str, *, when: str, plot: Path | None = None) -> str:
    """The generated Markdown for one benchmark, between its markers."""
    lines = [
        f"<!-- run_all:{name}:start -->",
        f"`python -m benchmarks.{name}` via `python -m benchmarks.run_all`, {when}:",
        "",
        "```text",
        output.rstrip(),
        "```",
    ]
    if plot is not None:
        lines += ["", f"![Throughput against number of tensors]({plot.name})"]
    lines.append(f"<!-- run_all:{name}:end -->")
    return "\n".join(lines)


def update_page(page: str, name: str, generated: str) -> str:
    """`page` with NAME's generated section replaced, or appended if it has none yet."""
    pattern = re.compile(
        rf"<!-- run_all:{re.escape(name)}:start -->.*?<!-- run_all:{re.escape(name)}:end -->",
        re.DOTALL,
    )
    if pattern.search(page):
        return pattern.sub(lambda _: generated, page, count=1)
    heading = "## Recorded runs"
    if heading not in page:
        page = page.rstrip("\n") + f"\n\n{heading}\n\nWritten by `python -m benchmarks.run_all`.\n"
    return page.rstrip("\n") + f"\n\n### `{name}`\n\n{generated}\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only", nargs="+", choices=MODULES, help="run only these sections")
    args = parser.parse_args(argv)
    when = machine()
    print(when)
    page = PAGE.read_text(encoding="utf-8")
    for name in args.only or MODULES:
        plot = PLOT if name == "bench_transfer" and torch.cuda.is_available() else None
        print(f"\n== {name} ==", flush=True)
        output = run_module(name, ["--plot", str(plot)] if plot else [])
        if output is None:
            print(f"benchmarks/{name}.py is not there yet: skipped.")
            continue
        print(output, end="", flush=True)
        page = update_page(page, name, section(name, output, when=when, plot=plot))
    if not args.no_write:
        PAGE.write_text(page, encoding="utf-8")
        print(f"\nUpdated {PAGE}")


if __name__ == "__main__":
    main()
