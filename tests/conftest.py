"""Test-session settings: one torch thread per pytest-xdist worker, and the long-lived objects of the
heavy imports frozen out of the garbage collector.

The README's test command runs two xdist workers on a 2-core machine; each worker with torch's default
of one thread per core oversubscribed the cores, and the suite took 9.1 minutes instead of 4.6. The
variable is set for the subprocesses tests start too (torchrun, the CLI)."""

from __future__ import annotations

import gc
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Tests that prove a model was freed call gc.collect(). With torch, transformers, peft and torch._dynamo
# imported, each full collection walked ~400,000 long-lived objects (0.2 s): most of tests/test_matrix.py's
# time (its deep-copy test: 70 s of 120). Freezing what exists once those imports are done leaves it out of
# every later collection (gc.freeze); the objects tests create are collected as before.
import peft  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401
import transformers  # noqa: E402,F401

import deltatune  # noqa: E402,F401

gc.collect()
gc.freeze()
