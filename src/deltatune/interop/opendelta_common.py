"""What every OpenDelta import reads first: the folder `save_finetuned` wrote, and the error it raises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .tensor_files import read_tensors


class OpenDeltaFormatError(ValueError):
    """An OpenDelta checkpoint deltatune cannot represent exactly, or not an OpenDelta checkpoint."""


CONFIG, WEIGHTS = "config.json", ("model.safetensors", "pytorch_model.bin")
SAVER = "delta_model.save_finetuned(folder)"


def is_opendelta_folder(folder: str | os.PathLike) -> bool:
    """A folder `save_finetuned` wrote: config.json with OpenDelta's `delta_type` and `backbone_class`."""
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "delta_type" in config and "backbone_class" in config


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not is_opendelta_folder(folder):
        raise OpenDeltaFormatError(
            f"{folder} is not an OpenDelta delta checkpoint (a config.json with delta_type and backbone_class, "
            f"as {SAVER} writes)"
        )
    return json.loads((folder / CONFIG).read_text()), read_tensors(folder, WEIGHTS, SAVER, OpenDeltaFormatError)
