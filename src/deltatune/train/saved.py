"""What a training run leaves behind, read back: a delta folder, or a head-only folder of the same shape.

A head-only run (frozen backbone, trained classifier) is the baseline every delta must beat, so it is
saved like a delta (`delta.safetensors` + `delta.json`, method "head", its tensors under the same
`__head__.` keys) and `deltatune eval`/`predict`/`inspect`/`merge` treat it as one. The JSON's
`metadata` holds what training knew (task, labels, every training setting), so those commands run
under the settings the delta was trained with instead of their own defaults.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.entry import load_delta
from ..core.io import (
    FORMAT,
    HEAD,
    DeltaIOError,
    check_backbone,
    fingerprint,
    read_meta,
    read_tensors,
    write_delta_folder,
)
from ..core.model import DeltaModel
from ..version import __version__

HEAD_ONLY = "head"  # the "method" a head-only folder names in its delta.json


def save_head(dm: DeltaModel, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write the trained task head (no delta) as a folder that `load_saved` and the CLI accept."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in dm.head_state_dict().items()}
    if not tensors:
        raise ValueError("the model has no task head to save")
    meta = {
        "format": FORMAT,
        "name": HEAD_ONLY,
        "config": {"method": HEAD_ONLY},
        "family": "head only (frozen backbone)",
        "sites": {},
        "num_parameters": 0,
        "head_parameters": sum(v.numel() for v in tensors.values()),
        "backbone": fingerprint(dm.backbone),
        "deltatune_version": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metadata": metadata,
    }
    return write_delta_folder(path, tensors, meta)


def is_head_only(meta: dict[str, Any]) -> bool:
    return meta.get("config", {}).get("method") == HEAD_ONLY


def set_label_names(model: nn.Module, labels: list[str]) -> None:
    """Give the model's config the task's class names, so a merged or exported model reports them."""
    config = getattr(model, "config", None)
    if config is None or not labels or getattr(config, "num_labels", None) != len(labels):
        return
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}


def _load_run(model: nn.Module, path: Path, meta: dict[str, Any]) -> DeltaModel:
    """A run that trained methods together (`--method lora --method dora`) saves one folder per delta; each alone
    is only part of the model it scored, so all are loaded, in the order they trained in: named by its second
    folder, DoRA loaded before LoRA on the same projections is another model (it warned, `core.order`)."""
    name = meta.get("name")
    mode = str((meta.get("metadata") or {}).get("mode") or "")
    order = mode.split("+") if "+" in mode and name in mode.split("+") else [name]
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    for other in order:
        if other in dm.deltas:
            continue
        folder = path if other == name else path.parent / f"delta-{other}"
        if not folder.is_dir():
            raise DeltaIOError(
                f"{path} was trained together with {other!r} ({mode}), and {folder} is missing: the delta alone "
                "is not the model that was scored; put the run's delta folders back side by side"
            )
        load_delta(dm, folder, other)
    return dm


def load_saved(model: nn.Module, path: str | os.PathLike) -> DeltaModel:
    """Attach a saved delta, or load a head-only folder's head into `model`; return the DeltaModel."""
    meta = read_meta(path)
    if not is_head_only(meta):
        dm = _load_run(model, Path(path), meta)
    else:
        dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
        check_backbone(meta.get("backbone", {}), dm.backbone)
        params = dict(dm.backbone.named_parameters())
        tensors = read_tensors(path, meta)
        heads = set(dm.head_parameter_names())
        stray = sorted(k for k in tensors if not k.startswith(HEAD) or k.removeprefix(HEAD) not in heads)
        if stray:  # a head-only folder writes the task head and nothing else of the backbone
            raise DeltaIOError(f"{path}: {stray[0]!r} is not this model's task head; was the file edited?")
        for key, value in tensors.items():
            name = key.removeprefix(HEAD)
            if name not in params or params[name].shape != value.shape:
                have = tuple(params[name].shape) if name in params else "none"
                raise DeltaIOError(
                    f"{path}: head tensor {name!r} has shape {tuple(value.shape)}, this model's {have}: "
                    "load the backbone the head was trained on, with the same number of labels"
                )
        with torch.no_grad():
            for key, value in tensors.items():
                target = params[key.removeprefix(HEAD)]
                target.copy_(value.to(dtype=target.dtype, device=target.device))
    set_label_names(dm.backbone, list(meta.get("metadata", {}).get("labels") or []))
    return dm
