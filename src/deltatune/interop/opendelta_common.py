"""What every OpenDelta import reads first: the folder `save_finetuned` wrote, and the error it raises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.io import is_opendelta
from .tensor_files import read_tensors


class OpenDeltaFormatError(ValueError):
    """An OpenDelta checkpoint deltatune cannot represent exactly, or not an OpenDelta checkpoint."""


CONFIG, WEIGHTS = "config.json", ("model.safetensors", "pytorch_model.bin")
SAVER = "delta_model.save_finetuned(folder)"


is_opendelta_folder = is_opendelta  # one test for the loaders' refusals, the import and the CLI


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not is_opendelta_folder(folder):
        raise OpenDeltaFormatError(
            f"{folder} is not an OpenDelta delta checkpoint (a config.json with delta_type and backbone_class, "
            f"as {SAVER} writes)"
        )
    return json.loads((folder / CONFIG).read_text()), read_tensors(folder, WEIGHTS, SAVER, OpenDeltaFormatError)
