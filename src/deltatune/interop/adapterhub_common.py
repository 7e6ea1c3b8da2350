"""What every AdapterHub (`adapters` library) folder shares: the files, the config checks, key placement, the head.

`model.save_adapter(folder, name)` writes `adapter_config.json` ({"config": {...}, "model_class",
"model_type", "hidden_size", "name", "version"}) and the tensors as `adapter.safetensors`
(`use_safetensors=True`) or `pytorch_adapter.bin` (a pickle: read with `torch.load(weights_only=True)`,
which builds tensors and plain containers only); a model with a task head also writes
`head_config.json` and `model_head.safetensors` / `pytorch_model_head.bin`. Keys carry the saving
model's own names (`bert.encoder.layer.0.output.adapters.<name>.adapter_up.weight`), which `place`
maps onto the user's model (a bare `BertModel` or a `BertForSequenceClassification`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.model import DeltaModel
from .module_names import saved_name_candidates
from .tensor_files import read_tensors

CONFIG, HEAD_CONFIG = "adapter_config.json", "head_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
META_FIELDS = frozenset({"config", "hidden_size", "model_class", "model_name", "model_type", "name", "version"})
# no effect on a trained adapter's outputs: what it is, how it was initialised
INIT_FIELDS = frozenset({"architecture", "init_weights", "init_weights_seed"})


class AdapterHubFormatError(ValueError):
    """An AdapterHub folder deltatune cannot represent exactly; the message says what and why."""


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, its "config", the adapter tensors) of an AdapterHub adapter folder."""
    folder = Path(folder)
    if (folder / "adapter_fusion_config.json").exists():
        raise AdapterHubFormatError(f"{folder} holds an AdapterFusion layer, which deltatune does not represent")
    if not (folder / CONFIG).exists():
        raise AdapterHubFormatError(f"{folder} has no {CONFIG}: not an AdapterHub adapter folder")
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterHubFormatError(f"{folder / CONFIG} is not valid JSON ({err})") from err
    if isinstance(meta, dict) and "peft_type" in meta:
        raise AdapterHubFormatError(f"{folder} is a PEFT adapter: load it with deltatune.interop.import_peft")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "model_class" not in meta:
        raise AdapterHubFormatError(f"{folder / CONFIG} is not AdapterHub's (no 'config' and 'model_class')")
    return (
        meta,
        meta["config"],
        read_tensors(folder, WEIGHTS, "save_adapter(..., use_safetensors=True)", AdapterHubFormatError),
    )


def check_fields(
    config: dict,
    what: str,
    honored: Collection[str],
    required: Mapping[str, tuple[Any, str]],
    training_only: Mapping[str, Any] = {},  # noqa: B006 - read only
    ignore_fields: Collection[str] = (),
) -> None:
    """Refuse a config field the import would pass over while AdapterHub acts on it.

    `honored`: fields read, or without effect on a trained adapter's outputs; `required`: field -> (the
    only value deltatune represents, what another value means); `training_only`: field -> default, for
    settings that change training but not the outputs (refused unless named in `ignore_fields`). Any
    other field is unknown (a later `adapters`' option) and refused unless named in `ignore_fields`."""
    for key, (value, meaning) in required.items():
        if key in config and config[key] != value:
            raise AdapterHubFormatError(
                f"this adapter uses {meaning} ({key}={config[key]!r}); deltatune's {what} cannot represent it exactly"
            )
    for key, default in training_only.items():
        if config.get(key, default) != default and key not in ignore_fields:
            raise AdapterHubFormatError(
                f"this adapter sets {key}={config[key]!r}, used in training only, which deltatune's {what} has not; "
                f"pass ignore_fields=[{key!r}] to import it without (its outputs in eval mode are the same)"
            )
    allowed = INIT_FIELDS | set(honored) | set(required) | set(training_only) | set(ignore_fields)
    unknown = sorted(k for k in config if k not in allowed)
    if unknown:
        shown = ", ".join(f"{k}={config[k]!r}" for k in unknown[:4])
        raise AdapterHubFormatError(
            f"adapter_config.json sets {shown}, unknown to deltatune's {what} import (a later `adapters`' option?), "
            f"which may change the outputs; if it does not, pass ignore_fields={unknown!r}"
        )


def check_backbone(meta: dict, model: nn.Module) -> None:
    """The adapter was trained on a model of this type and width."""
    config = getattr(model, "config", None)
    mine = getattr(config, "model_type", None), getattr(config, "hidden_size", None)
    theirs = meta.get("model_type"), meta.get("hidden_size")
    if theirs[0] is not None and mine[0] is not None and theirs[0] != mine[0]:
        raise AdapterHubFormatError(
            f"the adapter was saved from a {theirs[0]} model ({meta.get('model_class')}), this is {mine[0]}: "
            "load it onto the backbone it was trained on"
        )
    if theirs[1] is not None and mine[1] is not None and int(theirs[1]) != int(mine[1]):
        raise AdapterHubFormatError(
            f"the adapter was saved from a model of hidden size {theirs[1]}, this one has {mine[1]}: "
            "load it onto the backbone it was trained on"
        )


def place(model: nn.Module, saved: str) -> str:
    """The name in `model` of the module AdapterHub's saving model called `saved` (prefixes differ by head)."""
    names = dict(model.named_modules())
    for name in saved_name_candidates(model, saved):
        if name in names:
            return name
    raise AdapterHubFormatError(
        f"the adapter has tensors for {saved!r}, which {type(model).__name__} lacks (fewer layers? another "
        "architecture?): load it onto the backbone it was trained on"
    )


def check_layers(found: Collection[int], n_layers: int, leave_out: Collection[int], what: str) -> None:
    """The tensors cover exactly the layers AdapterHub puts the adapter on: all but `leave_out`."""
    expected = set(range(n_layers)) - {int(i) % n_layers for i in leave_out}
    if set(found) != expected:
        raise AdapterHubFormatError(
            f"the {what} tensors cover layers {sorted(found)}, but with leave_out={sorted(leave_out)} a "
            f"{n_layers}-layer model has the adapter on {sorted(expected)}: another base model, or an edited file?"
        )


def n_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if count is None:
        raise AdapterHubFormatError(f"{type(model).__name__} does not say its number of layers (num_hidden_layers)")
    return int(count)


def import_head(dm: DeltaModel, folder: str | os.PathLike, head: bool) -> None:
    """Copy a saved head that is the model's own classifier (same names and shapes); else one warning line."""
    folder = Path(folder)
    if not any((folder / n).exists() for n in HEAD_WEIGHTS):
        return
    tensors = read_tensors(folder, HEAD_WEIGHTS, "save_adapter(..., use_safetensors=True)", AdapterHubFormatError)
    try:
        head_meta = json.loads((folder / HEAD_CONFIG).read_text()) if (folder / HEAD_CONFIG).exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        head_meta = {}
    params = dict(dm.backbone.named_parameters())
    mapped = {place_param(dm.backbone, k): v for k, v in tensors.items()}
    own = set(dm.head_parameter_names())
    why = ""
    if not head:
        why = "head=False"
    elif isinstance(head_meta, dict) and head_meta.get("config") is not None:
        why = f"it is an AdapterHub flexible head ({head_meta['config'].get('head_type', '?')}), not the model's own"
    elif not all(k in own and params[k].shape == v.shape for k, v in mapped.items() if k is not None) or None in mapped:
        why = f"its tensors ({', '.join(sorted(tensors)[:3])}) do not match this model's head ({', '.join(sorted(own)[:3])})"
    if why:
        warnings.warn(f"the AdapterHub head in {folder} is not imported: {why}", UserWarning, stacklevel=3)
        return
    with torch.no_grad():
        for k, v in mapped.items():
            params[k].copy_(v.to(params[k].dtype))
    dm.freeze(train_head=True)  # AdapterHub trained it with the adapter; keep training it


def place_param(model: nn.Module, saved: str) -> str | None:
    owner, _, leaf = saved.rpartition(".")
    try:
        return f"{place(model, owner)}.{leaf}" if owner else None
    except AdapterHubFormatError:
        return None
