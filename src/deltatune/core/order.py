"""Deltas on one module that do not commute: the order they act in is part of the model they make.

Hooks on a module run in the order the deltas were attached, so LoRA then an adapter on one projection is
another model than the adapter then LoRA (0.26 apart on a tiny Llama after five joint steps). Deltas that
only add to the weights (`merge_adds`) commute. `save_pretrained` keeps the order; a delta saved alone records
the deltas attached before it on its modules that it does not commute with, and loading it without them in
place first warns: its outputs are not those of the model it was saved from.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .merge import non_commuting_sites

if TYPE_CHECKING:
    from .model import DeltaModel


def content(delta: torch.nn.Module) -> str:
    """A short hash of a delta's tensors: the same delta loaded under another name is recognised by it."""
    digest = hashlib.sha256()
    for key, tensor in sorted(delta.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def before(dm: DeltaModel, name: str) -> list[dict[str, str]]:
    """The deltas attached before `name` on one of its modules that it does not commute with: name and content."""
    delta, out = dm.delta(name), []
    for other_name, other in dm.deltas.items():
        if other_name == name:
            break
        if non_commuting_sites(delta, other):
            out.append({"name": other_name, "sha": content(other)})
    return out


def _same(entry: Any, name: str, sha: str) -> bool:
    """An earlier delta is the recorded one by name or by content (loaded under another name); an entry of an
    older delta.json is a name alone."""
    if isinstance(entry, dict):
        return entry.get("name") == name or entry.get("sha") == sha
    return entry == name


def check(dm: DeltaModel, name: str, meta: dict[str, Any]) -> None:
    """Warn when a loaded delta was saved after deltas on its modules that are not attached before it now."""
    recorded = meta.get("after") or []
    if not isinstance(recorded, list) or not recorded:
        return
    now = list(dm.deltas)
    earlier = [(n, content(dm.deltas[n])) for n in now[: now.index(name)]]
    matched = [next((i for i, (n, sha) in enumerate(earlier) if _same(e, n, sha)), None) for e in recorded]
    if None in matched or matched != sorted(matched):
        wanted = [e.get("name") if isinstance(e, dict) else e for e in recorded]
        earlier = [n for n, _ in earlier]
        warnings.warn(
            f"delta {name!r} was saved after {wanted} on the same modules, which do not commute with it (their "
            f"order changes the outputs), and is now attached after {earlier or 'none of them'}: load "
            f"{', '.join(map(repr, wanted))} first, in that order, or save them together with save_pretrained",
            stacklevel=4,
        )
