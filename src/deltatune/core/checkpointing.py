"""Gradient checkpointing with a frozen backbone: the deltas inside checkpointed layers must get gradients.

Reentrant checkpointing (transformers 4.x's default, `Trainer(gradient_checkpointing=True)` included)
returns outputs that need no gradient when none of the checkpointed layer's inputs does. With the
backbone frozen, the embeddings' output needs none, so every delta inside a checkpointed layer got no
gradient and never trained while the run "succeeded" on the task head alone (transformers 4.57.6, tiny
BERT + LoRA: 0 of 8 LoRA tensors moved; torch's only word was "None of the inputs have
requires_grad=True"). transformers makes the embedding output require grad for PEFT models (4.x) and
for text models (5.x); a DeltaModel gets the same from a hook on the backbone's input embeddings,
installed with the first delta and removed with the last, acting only in a training forward with
checkpointing on (otherwise gradients reach the deltas as they are, and none is computed needlessly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import compat

HANDLE = "_deltatune_checkpointing"  # the backbone attribute holding the hook's handle: one hook per backbone


def checkpointing_on(backbone: nn.Module) -> bool:
    """Whether any module of `backbone` checkpoints (transformers sets `gradient_checkpointing` on each)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules())


def watch(backbone: nn.Module) -> None:
    """Make the input embeddings' output require grad in training forwards while checkpointing is on."""
    embeddings = compat.input_embeddings(backbone)  # none on CLIPModel (two towers: attach failed on it)
    if getattr(backbone, HANDLE, None) is not None or not isinstance(embeddings, nn.Module):
        return

    def after_embeddings(module: nn.Module, args: Any, output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor):
            return None
        if output.requires_grad or not output.is_floating_point() or not checkpointing_on(backbone):
            return None
        return output.requires_grad_(True)

    setattr(backbone, HANDLE, embeddings.register_forward_hook(after_embeddings))


def unwatch(backbone: nn.Module) -> None:
    """Remove the hook (the last delta is gone: the backbone goes back as it came)."""
    handle = backbone.__dict__.pop(HANDLE, None)
    if handle is not None:
        handle.remove()
