"""The tensor file of a folder another library saved: its safetensors file, else its pickle read safely.

PEFT before 0.7 and AdapterHub by default (`pytorch_adapter.bin`) save adapters as pickles, and many
published adapters exist only so. A pickle is read only with `torch.load(weights_only=True)`, whose
unpickler builds tensors and plain containers and refuses anything else, so no code in the file runs.
"""

from __future__ import annotations

from pathlib import Path

import torch


def read_tensors(folder: Path, names: tuple[str, str], saver: str, error: type[Exception]) -> dict[str, torch.Tensor]:
    """`names`: (safetensors file, pickle file); `saver`: the call that writes safetensors, for the messages."""
    from safetensors.torch import load_file

    safe, pickle = (folder / n for n in names)
    if safe.exists():
        try:
            return load_file(str(safe))
        except Exception as err:  # noqa: BLE001 - safetensors' own error type: a truncated or damaged file
            raise error(f"{safe} cannot be read ({err}): a truncated or corrupted file; save it again") from err
    if not pickle.exists():
        raise error(f"{folder} has neither {names[0]} nor {names[1]}; save it with {saver}")
    try:
        tensors = torch.load(pickle, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler refuses anything but tensors and plain containers
        raise error(f"{pickle} is not a plain tensor file ({type(err).__name__}); re-save it with {saver}") from err
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise error(f"{pickle} does not hold a name -> tensor mapping")
    return tensors
