"""The two ways in: `attach` a new delta to a model, or `load_delta` a saved one (both give a DeltaModel)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .delta import DeltaConfig
from .io import load_into
from .model import DeltaModel
from .registry import get_config


def attach(
    model: nn.Module,
    config: DeltaConfig | str,
    name: str = "default",
    *,
    train_head: bool | str | None = "auto",
    **settings: Any,
) -> DeltaModel:
    """Attach a delta to a transformers model; the model's code is not edited.

    `config`: a method config, or a method name with its settings as keywords: `attach(model, "lora", r=16)`, or
    another library's config that a registered reader translates (PEFT's LoraConfig and IA3Config).

    The default train_head="auto" trains the task head where the model's head is new for the task
    (`head_trains_by_default`), as PEFT's SEQ_CLS/TOKEN_CLS/QA task types do, so a Trainer script
    does not silently train a delta against a frozen random classifier. Pass True or False to choose.
    On a DeltaModel, "auto" keeps the choice already made.
    """
    if settings:
        if not isinstance(config, str):
            raise TypeError(
                f"settings ({', '.join(settings)}) go with a method name, attach(model, 'lora', r=16), or into the "
                f"config itself, {type(config).__name__}({next(iter(settings))}=...)"
            )
        config = get_config(config, **settings)
    if isinstance(model, DeltaModel) and train_head == "auto":
        train_head = None
    wrapped = model if isinstance(model, DeltaModel) else DeltaModel(model)
    return wrapped.add(name, config, train_head=train_head)


def load_delta(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    strict_backbone: bool = True,
    enabled: bool = True,
    head: bool = True,
) -> DeltaModel:
    """Attach a saved delta to `model` (a backbone or a DeltaModel) and return the DeltaModel (see `core.io`)."""
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    return load_into(dm, path, name, strict_backbone=strict_backbone, enabled=enabled, head=head)
