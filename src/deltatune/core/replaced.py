"""A delta whose module was replaced or resized after attaching: refused at the next forward, not lost.

Deltas act through hooks on module objects and are sized for their weights. `model.resize_token_embeddings(n)`
after attaching builds a new LM head (Llama) or resizes a tied one's weight in place (GPT-2), and
`model.classifier = nn.Linear(...)` replaces a module: the delta then acted on nothing (LoRA on Llama's
`lm_head`: logits 15.3 off, no error) or on a tensor of another shape (GPT-2: torch's "shape '[-1, 100]'
is invalid for input of size 1664"). Each module a delta acts on is recorded with its parent and its
parameters' shapes when the delta is added; a forward pre-hook on the backbone checks them (a dict
lookup and a shape per module), so any way of calling the model (the DeltaModel, the backbone, pipelines,
`generate`) says what happened instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .delta import Delta, DeltaError
from .layers import logical_shape, stored_weight

HANDLE = "_deltatune_replaced"  # the backbone attribute holding the hook's handle: one hook per backbone
MODE = "_deltatune_mode"  # the mode the deltas last took from the backbone (at a forward, or dm.train)
# name, parent's submodules, attribute, module, its parameters' dict, and per stored tensor: (name, tensor, shape)
Anchor = tuple[str, dict, str, nn.Module, dict, list[tuple[str, torch.Tensor, torch.Size]]]


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Size]]:
    names = list(module._parameters) + list(getattr(module, "parametrizations", {}).keys())
    return [(n, t, logical_shape(t)) for n in names if (t := stored_weight(module, n)) is not None]


def anchor(backbone: nn.Module, delta: Delta) -> None:
    """Record where each module `delta` acts on sits (its parent and attribute) and its parameters' shapes."""
    hooks = delta._hooks
    if hooks is None:
        return
    wanted = {id(m) for m in hooks.hooked()} | {id(m) for m, _ in hooks.claimed()}
    anchors: list[Anchor] = []
    for parent_name, parent in backbone.named_modules():
        for attr, child in parent._modules.items():
            if child is not None and id(child) in wanted:
                wanted.discard(id(child))
                name = f"{parent_name}.{attr}" if parent_name else attr
                anchors.append((name, parent._modules, attr, child, child._parameters, _tensors(child)))
    delta._anchors = anchors
    delta._own_shapes = {n: p.shape for n, p in delta.named_parameters()}  # FSDP1 flattens them (core.sharded)


def _holds(current: nn.Module | None, module: nn.Module) -> bool:
    """Whether `module` is still called from its place: the module there now wraps it (PEFT's layer around its
    `base_layer`, a distributed wrapper), so its hooks still fire."""
    return current is not None and any(m is module for m in current.modules())


def _sharded_in_place(tensor: torch.Tensor, shape: torch.Size) -> bool:
    """The same parameter, sharded between forwards by a distributed wrapper that restores it inside its unit's
    forward: DeepSpeed ZeRO-3 keeps the shape as `ds_shape`; FSDP1 with use_orig_params keeps the Parameter object
    as a flat view of this rank's shard (`_fsdp_flattened`)."""
    return getattr(tensor, "ds_shape", None) == shape or bool(getattr(tensor, "_fsdp_flattened", False))


def check(deltas: dict[str, Delta]) -> None:
    """Refuse to compute with a delta (enabled or merged) whose module is gone from its place or resized.

    Per module: one dict lookup, and per parameter a shape (about 0.3 us; LoRA on the seven projections of a
    30-layer model, 210 modules, checks in well under a millisecond). A new parameter of the same shape
    (weights loaded by assignment) leaves the delta fitting, and DeepSpeed ZeRO-3 empties a parameter's
    storage between forwards but keeps its shape as `ds_shape`, FSDP1 flattens it (`_sharded_in_place`): none is
    refused. A 4-bit weight (bitsandbytes) is compared by its logical shape: its packed storage is repacked at
    the first CPU forward."""
    for dname, delta in deltas.items():
        if not (delta.enabled or delta.merged):
            continue
        for name, siblings, attr, module, params, tensors in getattr(delta, "_anchors", ()):
            current = siblings.get(attr)
            if current is not module and not _holds(current, module):
                raise DeltaError(
                    f"delta {dname!r} ({delta.config.method}) acts on {name}, which was replaced after attaching "
                    "(resize_token_embeddings, quantize_dynamic, or a module assigned there), so the delta no "
                    "longer reaches it; resize or replace modules before attaching, or detach it and attach it again"
                )
            for pname, tensor, shape in tensors:
                now = params.get(pname, tensor)
                if (
                    now is not None
                    and now.shape != shape
                    and logical_shape(now) != shape
                    and not _sharded_in_place(now, shape)
                ):
                    raise DeltaError(
                        f"delta {dname!r} ({delta.config.method}) was built for {name}.{pname} of shape "
                        f"{tuple(shape)}, which is now {tuple(now.shape)} (resize_token_embeddings after attaching?); "
                        "resize before attaching, or detach the delta and attach it again"
                    )


def watch(backbone: nn.Module, deltas: nn.ModuleDict) -> None:
    """Anchor the deltas added since the last call; check every delta's modules before each forward of `backbone`,
    and give the deltas the backbone's train/eval mode."""
    for delta in deltas.values():
        if not hasattr(delta, "_anchors"):
            anchor(backbone, delta)
    if getattr(backbone, HANDLE, None) is not None:
        return

    def before_forward(module: nn.Module, args: Any) -> None:
        if "peft_config" in module.__dict__:  # get_peft_model(model) after attaching: PEFT marks the model it injected
            raise DeltaError(
                "PEFT injected its layers into this model after deltas were attached (get_peft_model(model, ...) or "
                "model.add_adapter(...)): they would train beside the deltas and be left out of their saves; rebuild "
                "the model and attach one library's adapters (dt.attach(model, lora_config) reads a PEFT LoraConfig)"
            )
        check(deltas)
        # `model.eval()` / `model.train()` on the backbone does not reach the deltas, held beside it: their dropout,
        # AdaLoRA's orthogonality term and diff pruning's gates kept the mode they were added in. A change of the
        # backbone's mode is passed on; a delta switched on its own afterwards (`delta.train()`) keeps its mode.
        if module.training != seen["mode"]:
            seen["mode"] = module.training
            for delta in deltas.values():
                delta.train(module.training)

    seen = backbone.__dict__[MODE] = {"mode": backbone.training}
    setattr(backbone, HANDLE, backbone.register_forward_pre_hook(before_forward))


def saw_mode(dm: Any) -> Any:
    """`dm.train(mode)` set the deltas' mode with the backbone's: the next change of the backbone's mode alone (a
    `model.eval()` before any forward) is passed on from there."""
    seen = dm.backbone.__dict__.get(MODE)
    if seen is not None:
        seen["mode"] = dm.backbone.training
    return dm


def unwatch(backbone: nn.Module) -> None:
    """Remove the hook (the last delta is gone: the backbone goes back as it came)."""
    backbone.__dict__.pop(MODE, None)
    handle = backbone.__dict__.pop(HANDLE, None)
    if handle is not None:
        handle.remove()
