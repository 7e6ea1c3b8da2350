"""One delta solution as one vector, with a layout that says which slice is which tensor.

The layout is the delta's floating-point state (after `finalize()`, so a prefix is its key/value
prefixes, not the MLP that produced them) in sorted parameter-name order, each tensor flattened in
row-major order. Sorting makes the layout independent of attach order; recording names and shapes
makes a vector refuse to unflatten into a delta of another shape instead of silently misplacing it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core import atomic


@dataclasses.dataclass(frozen=True)
class Layout:
    """Names and shapes of a delta's tensors, in the order their values sit in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        names = tuple(sorted(k for k, v in state.items() if v.is_floating_point()))
        return cls(names, tuple(tuple(state[n].shape) for n in names))

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Layout:
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))

    def check(self, other: Layout, what: str) -> None:
        if self != other:
            mine, theirs = (
                dict(zip(self.names, self.shapes, strict=True)),
                dict(zip(other.names, other.shapes, strict=True)),
            )
            diff = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))[:5]
            raise ValueError(
                f"{what}: the delta layouts differ at {diff}; collect the solutions again with the same method "
                "settings and backbone"
            )


def flatten(state: Mapping[str, torch.Tensor], layout: Layout | None = None) -> torch.Tensor:
    """The delta's tensors concatenated in layout order (float32, on the CPU)."""
    layout = layout or Layout.of(state)
    Layout.of(state).check(layout, "flatten")
    return torch.cat([state[n].detach().float().reshape(-1).cpu() for n in layout.names])


def unflatten(vector: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of `vector` shaped as the delta's tensors; differentiable, so gradients reach the vector."""
    if vector.dim() != 1 or vector.numel() != layout.size:
        raise ValueError(f"a vector of {tuple(vector.shape)} does not fit a layout of {layout.size} numbers")
    parts = torch.split(vector, layout.sizes)
    return {n: p.view(s) for n, p, s in zip(layout.names, parts, layout.shapes, strict=True)}


def save_vectors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Tensors as safetensors with JSON metadata, written atomically (a crash leaves the old file)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, {"meta": json.dumps(meta)})
    atomic.write_file(path, data)


def load_vectors(
    path: str | os.PathLike, what: str = "a file of this study", needs: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of `save_vectors`; a file that is not `what` (a truncated one, a head copied over a
    solution) is refused naming its path, where a bare SafetensorError or KeyError: 'solution' came out."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run the stage that writes it first (see `deltatune subspace -h`)")
    fix = "delete it and run the stage that writes it again (see `deltatune subspace -h`)"
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("meta", "{}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(text)
    except (SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not {what} (unreadable: {e}); it was truncated or replaced: {fix}") from None
    missing = [k for k in needs if k not in tensors]
    if missing or not isinstance(meta, dict):
        held = ", ".join(sorted(tensors)[:4]) or "no tensors"
        raise ValueError(
            f"{path} is not {what}: it lacks {', '.join(missing) or 'its metadata'} (it holds {held}); {fix}"
        )
    return tensors, meta


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic.write_file(path, json.dumps(data, indent=2, default=str))
