"""Test-session settings: one torch thread per pytest-xdist worker.

The README's test command runs two xdist workers on a 2-core machine; each worker with torch's default
of one thread per core oversubscribed the cores, and the suite took 9.1 minutes instead of 4.6. The
variable is set for the subprocesses tests start too (torchrun, the CLI)."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
