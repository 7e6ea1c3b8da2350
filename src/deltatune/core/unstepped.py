"""A warning when the deltas collect gradients that no optimizer applies: training changes nothing.

`Trainer(model=backbone)` after `dm = attach(backbone, ...)` (or an optimizer over
`backbone.parameters()`) runs the deltas through the backbone's hooks, so the loss and its gradients
are right, but the optimizer holds only the backbone's trainable parameters (the head at most):
the run "succeeds" and the deltas never move. An optimizer step changes a parameter in place
(its `_version` grows, or with fused AdamW only its values); a delta that keeps receiving gradients while
its tensor stays untouched for many training forwards in a row is trained by nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from . import marks, sharded

UNSTEPPED_FORWARDS = 100  # above any usual gradient accumulation (there the count restarts at each step)
SAMPLED = 1 << 20  # entries of the watched tensor copied to tell a step that keeps `_version` (fused AdamW)
UNSTEPPED_MESSAGE = (
    "delta {name!r} has had gradients for {n} training forwards but no optimizer step changed it: the optimizer "
    "does not hold the deltas' parameters, so they never train. With transformers.Trainer (or sentence-transformers' "
    "trainer) pass the DeltaModel, Trainer(model=dm), not the backbone; sentence-transformers' trainers optimize the "
    "loss's parameters, so its loss must hold the DeltaModel too (Loss(dm); a CrossEncoder loss takes the CrossEncoder "
    "only: build it, then set loss.model = dm); in your own loop optimize dm.parameters() (or "
    "deltatune.train.hf.optimizer(dm))"
)


FROZEN_HEAD_MESSAGE = (
    "the DeltaModel trains the task head (train_head=True), but none of the head's parameters ({head}) requires a "
    "gradient any more: something froze them after attaching (peft.prepare_model_for_kbit_training does), so the "
    "head stays as it was loaded; prepare the model before attaching, or call dm.freeze(train_head=True) after"
)
SHARED_HEAD_MESSAGE = (
    "the task head ({head}) trains, and every delta's rows share it: the deltas not training now, {idle}, will be "
    "served with the head this training changes (a reranker trained beside another moved the other's scores); "
    "train with dm.freeze(train_head=False) to keep their head, or serve them on a model of their own"
)
HANDLE = "_deltatune_unstepped"  # the backbone attribute holding the hook's handle: one hook per backbone


class _Handles:
    """The forward pre-hook and the gradient hooks `watch` set, removed together."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def remove(self) -> None:
        for handle in self.items:
            handle.remove()
        self.items.clear()


def _sample(p: torch.Tensor) -> torch.Tensor:
    """A copy of (up to a million entries of) the watched tensor: what an optimizer step would change."""
    return p.detach().flatten()[:SAMPLED].clone()


def watch(backbone: nn.Module, deltas: nn.ModuleDict) -> None:
    """Count, before each training forward of `backbone`, the forwards each delta went unstepped.

    A gradient counts when one reached the delta since the last forward: its `.grad` is set, or a backward
    accumulated into it (counted by a hook) and `zero_grad` cleared it since. The second is
    `CrossEncoderTrainer(model=dm)` with a loss built on the CrossEncoder: the Trainer zeroes the DeltaModel's
    gradients at every step, but its optimizer (the loss's parameters) holds the classifier only. A step is
    seen by the tensor's `_version`, except that fused AdamW (the Trainer's default) writes without bumping
    it: so before warning, the tensor is compared with its copy from the start of the count (one comparison
    per 100 forwards, no device sync in between)."""
    if getattr(backbone, HANDLE, None) is not None:
        return
    handles = _Handles()
    # delta name -> [its watched tensor's version, forwards unstepped, backwards seen, the tensor's copy]
    seen: dict[str, list[Any]] = {}
    backwards: dict[int, list[int]] = {}  # id(watched tensor) -> [backward passes that accumulated into it]

    def counted(p: torch.Tensor) -> int:
        if id(p) not in backwards:
            backwards[id(p)] = box = [0]
            handles.items.append(
                p.register_post_accumulate_grad_hook(lambda _p, box=box: box.__setitem__(0, box[0] + 1))
            )
        return backwards[id(p)][0]

    head_checked: list[bool] = []

    def check_head(module: nn.Module) -> None:
        """Once, at the first training forward: a head set to train whose parameters were all frozen since."""
        head_checked.append(True)
        dm = marks.owner(module)
        names = set(dm.head_parameter_names()) if dm is not None and dm.train_head else set()
        params = [p for n, p in module.named_parameters() if n in names]
        shown = ", ".join(sorted({n.rsplit(".", 1)[0] for n in names}))
        if params and not any(p.requires_grad for p in params):
            warnings.warn(FROZEN_HEAD_MESSAGE.format(head=shown), stacklevel=3)
        idle = [n for n, d in deltas.items() if not d.enabled]
        if params and idle and any(p.requires_grad for p in params):
            warnings.warn(SHARED_HEAD_MESSAGE.format(head=shown, idle=idle), stacklevel=3)

    def before_forward(module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not head_checked:
            check_head(module)
        sharded.check_wrapped(module, deltas)  # DDP around the backbone: the deltas' gradients averaged by nothing
        for name, delta in deltas.items():
            p = next((p for p in delta.parameters() if p.requires_grad), None)
            # inside FSDP2's forward the parameter is its gathered copy, not a leaf: its gradient lives on the shard
            if p is None or not p.is_leaf:
                seen.pop(name, None)
                continue
            n = counted(p)
            state = seen.get(name)
            if state is None or state[0] != p._version:
                seen[name] = [p._version, 0, n, _sample(p)]
                continue
            if p.grad is None and n == state[2]:
                continue  # no gradient since the last forward: nothing for an optimizer to apply
            state[1:3] = [state[1] + 1, n]
            if state[1] < UNSTEPPED_FORWARDS:
                continue
            if not torch.equal(state[3], _sample(p)):  # stepped by an optimizer that keeps _version (fused)
                seen[name] = [p._version, 0, n, _sample(p)]
            elif state[1] == UNSTEPPED_FORWARDS:
                warnings.warn(UNSTEPPED_MESSAGE.format(name=name, n=UNSTEPPED_FORWARDS), stacklevel=2)

    handles.items.append(backbone.register_forward_pre_hook(before_forward))
    setattr(backbone, HANDLE, handles)


def unwatch(backbone: nn.Module) -> None:
    """Remove the hook (the last delta is gone: the backbone goes back as it came)."""
    handle = backbone.__dict__.pop(HANDLE, None)
    if handle is not None:
        handle.remove()
