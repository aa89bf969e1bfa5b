"""Print the bug corpus table (issue 15): what devicekit says about each of the corpus's bugs.

Run: `python -m benchmarks.bug_corpus` from the repository root. Each case of
`tests/bug_corpus` runs, buggy and fixed, under `devicekit.simulated_devices("cuda", 2)`; the
table says whether the simulation caught it, whether `devicekit.audit` flags the objects it
hands over, whether the message names the line that made the stray tensor and its holder, and
whether the fix is the right one; then the totals against the targets.
"""

from __future__ import annotations

import torch

from tests.bug_corpus import CASES, run, table


def main() -> None:
    print(f"torch {torch.__version__}; {len(CASES)} cases under simulated_devices('cuda', 2)\n")
    print(table([run(case) for case in CASES]))


if __name__ == "__main__":
    main()
