"""Evaluating a model for a moment and giving every module back the mode it had.

`was = model.training; model.eval(); ...; model.train(was)` puts every submodule in the top module's mode
afterwards: a module the user kept in eval mode inside a training model (frozen batch-norm statistics, a backbone
whose dropout is off while only the deltas train) came back in training mode after one routed encode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model.eval()` inside the block; each module's own train/eval flag as it was after it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
