"""What this machine really has, whatever simulation is active.

Under `--devicekit-simulate=cuda:2` the run-wide simulation is active while test modules are
imported, so `torch.cuda.is_available()` is `True` at import time on a CPU-only machine. Tests
that skip "where CUDA is real" (devicekit refuses to simulate real devices) ask `REAL_CUDA`.
"""

from __future__ import annotations

import sys

import torch


def _really_has_cuda() -> bool:
    simulate = sys.modules.get("devicekit._simulate")
    if simulate is None:  # no simulation was ever entered: torch's answer is the machine's
        return torch.cuda.is_available()
    return bool(simulate._real_count("cuda"))


REAL_CUDA = _really_has_cuda()
