"""A folder `save_pretrained` wrote, read back as the `state_dict()` of the DeltaModel that wrote it.

Trainers built on transformers' Trainer that load a checkpoint their own way (sentence-transformers' load of
the best model at the end and its resume) rebuild the model's class from the checkpoint folder and copy
`loaded.state_dict()` into the model. A DeltaModel's checkpoint holds its deltas (and a trained head) only, so
`type(dm)(folder)` (`core.signed`) gives a `SavedDeltas`, whose state is keyed as `dm.state_dict()` and loads
with `dm.load_state_dict` exactly; before, sentence-transformers' trainer logged an error and kept the last
step's deltas instead of the best ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .io import META, DeltaIOError, read_meta, read_tensors
from .targeting import HEAD_KEY

INDEX = "deltatune_model.json"
INDEX_FORMAT = "deltatune.model/1"


def read_index(path: Path) -> dict[str, Any]:
    """deltatune_model.json: which deltas a `save_pretrained` folder holds, in order, enabled or not."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaIOError(f"{path / INDEX} is not valid JSON ({err}); save the model again") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not index.get("deltas"):
        raise DeltaIOError(f"{path / INDEX} is not a deltatune model index (format {INDEX_FORMAT!r} expected)")
    return index


def folder_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a `save_pretrained` (or single `save_delta`) folder, keyed as `DeltaModel.state_dict()`:
    `deltas.<name>.<tensor>`, and the task head's `backbone.<parameter>`. Each file's hash is checked."""
    path = Path(path)
    if (path / INDEX).exists():
        entries = [(e["name"], path / e["folder"]) for e in read_index(path)["deltas"]]
    else:
        entries = [(read_meta(path).get("name", "default"), path)]  # read_meta names a folder that is neither
    state: dict[str, torch.Tensor] = {}
    for name, folder in entries:
        for key, tensor in read_tensors(folder).items():
            if key.startswith(HEAD_KEY):  # every delta of a save carries the same head
                state[f"backbone.{key[len(HEAD_KEY) :]}"] = tensor
            else:
                state[f"deltas.{name}.{key}"] = tensor
    return state


class SavedDeltas:
    """What `type(dm)(folder)` returns: the checkpoint's state, read when asked."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).exists() and not (self.path / META).exists():
            read_meta(self.path)  # names what the folder is instead (a full model, a PEFT adapter, ...)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return folder_state(self.path)

    def __repr__(self) -> str:
        return f"SavedDeltas({str(self.path)!r})"
