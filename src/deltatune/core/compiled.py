"""torch.compile: a compiled call must see every delta installed since it was traced.

Dynamo guards on the Python state a compiled call read (a delta's `enabled`, `merged`, `route`, a
module's class under a parametrization, the keys of a hook dict that held hooks), but by default
(`torch._dynamo.config.skip_nnmodule_hook_guards`) not on a module's hook dicts while they are empty.
A delta installed after the first compiled call, whose hooks landed on modules that had none, was
left out of the compiled graph without a word: tiny BERT with an adapter, `torch.compile(dm)`, then
LoRA added gave logits 9.1e-3 off the eager ones (IA3 2.7e-4, prompt 2.2e-2, prefix 1.5e-3); so did
a backbone compiled in place, before the first delta (4.6e-3) or after it (4.0e-3). A token read at
the top of the compiled call is not enough: a graph break before the hooked layers (a user's hook
that prints) resumes in a frame with guards of its own, which kept running stale (5.1e-3).

So installing a delta makes dynamo guard on empty hook dicts too, process-wide
(`skip_nnmodule_hook_guards = False`, left so), and when that setting was on, drops the graphs traced
under it (`torch.compiler.reset()`: they recompile on their next call, now guarded). It happens once
per process, or again after something sets the option back. A model whose torch has not loaded
dynamo yet has no compiled graph to drop: the option is set at the first install after it loads.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def guard_hooks() -> None:
    """Before hooks are installed: compiled graphs must notice them (see the module docstring)."""
    dynamo = sys.modules.get("torch._dynamo")
    config = getattr(dynamo, "config", None)
    if config is None or not getattr(config, "skip_nnmodule_hook_guards", False):
        return
    config.skip_nnmodule_hook_guards = False
    torch.compiler.reset()


def _wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and type(module).__module__.startswith("torch._dynamo")


def refuse_wrapped(backbone: nn.Module) -> str | None:
    """Why deltas cannot act inside torch.compile's wrapper (names), with the order that works; None if none."""
    where = next((name or "this model" for name, m in backbone.named_modules() if _wrapper(m)), None)
    if where is None:
        return None
    return (
        f"{where} is torch.compile's wrapper (OptimizedModule), whose module names start with '_orig_mod.', so the "
        "saved delta would load onto no uncompiled model; attach to the model itself, then compile the DeltaModel "
        "(dm = torch.compile(dm)) or the model in place (model.compile())"
    )
