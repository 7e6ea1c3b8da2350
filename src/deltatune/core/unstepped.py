"""A warning when the deltas collect gradients that no optimizer applies: training changes nothing.

`Trainer(model=backbone)` after `dm = attach(backbone, ...)` (or an optimizer over
`backbone.parameters()`) runs the deltas through the backbone's hooks, so the loss and its gradients
are right, but the optimizer holds only the backbone's trainable parameters (the head at most):
the run "succeeds" and the deltas never move. An optimizer step changes a parameter in place
(its `_version` grows) and `zero_grad` clears its gradient; a delta whose gradient stays set while
its tensor stays untouched for many training forwards in a row is trained by nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from . import sharded

UNSTEPPED_FORWARDS = 100  # above any usual gradient accumulation (there the count restarts at each step)
UNSTEPPED_MESSAGE = (
    "delta {name!r} has had gradients for {n} training forwards but no optimizer step changed it: the optimizer "
    "does not hold the deltas' parameters, so they never train. With transformers.Trainer (or sentence-transformers' "
    "trainer) pass the DeltaModel, Trainer(model=dm), not the backbone; in your own loop optimize dm.parameters() (or "
    "deltatune.train.hf.optimizer(dm))"
)


HANDLE = "_deltatune_unstepped"  # the backbone attribute holding the hook's handle: one hook per backbone


def watch(backbone: nn.Module, deltas: nn.ModuleDict) -> None:
    """Count, before each training forward of `backbone`, the forwards each delta went unstepped."""
    if getattr(backbone, HANDLE, None) is not None:
        return
    seen: dict[str, list[int]] = {}  # delta name -> [its watched tensor's version, forwards unchanged]

    def before_forward(module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        sharded.check_wrapped(module, deltas)  # DDP around the backbone: the deltas' gradients averaged by nothing
        for name, delta in deltas.items():
            p = next((p for p in delta.parameters() if p.requires_grad), None)
            # inside FSDP2's forward the parameter is its gathered copy, not a leaf: its gradient lives on the shard
            if p is None or not p.is_leaf or p.grad is None:
                seen.pop(name, None)
                continue
            state = seen.setdefault(name, [p._version, 0])
            if state[0] != p._version:
                state[:] = [p._version, 0]
                continue
            state[1] += 1
            if state[1] == UNSTEPPED_FORWARDS:
                warnings.warn(UNSTEPPED_MESSAGE.format(name=name, n=UNSTEPPED_FORWARDS), stacklevel=2)

    setattr(backbone, HANDLE, backbone.register_forward_pre_hook(before_forward))


def unwatch(backbone: nn.Module) -> None:
    """Remove the hook (the last delta is gone: the backbone goes back as it came)."""
    handle = backbone.__dict__.pop(HANDLE, None)
    if handle is not None:
        handle.remove()
