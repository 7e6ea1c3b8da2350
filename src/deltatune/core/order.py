"""Deltas on one module that do not commute: the order they act in is part of the model they make.

Hooks on a module run in the order the deltas were attached, so LoRA then an adapter on one projection is
another model than the adapter then LoRA (0.26 apart on a tiny Llama after five joint steps). Deltas that
only add to the weights (`merge_adds`) commute. `save_pretrained` keeps the order; a delta saved alone records
the deltas attached before it on its modules that it does not commute with, and loading it without them in
place first warns: its outputs are not those of the model it was saved from.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from .merge import non_commuting_sites

if TYPE_CHECKING:
    from .model import DeltaModel


def before(dm: DeltaModel, name: str) -> list[str]:
    """The deltas attached before `name` on one of its modules that it does not commute with."""
    delta, out = dm.delta(name), []
    for other_name, other in dm.deltas.items():
        if other_name == name:
            break
        if non_commuting_sites(delta, other):
            out.append(other_name)
    return out


def check(dm: DeltaModel, name: str, meta: dict[str, Any]) -> None:
    """Warn when a loaded delta was saved after deltas on its modules that are not attached before it now."""
    wanted = meta.get("after") or []
    if not isinstance(wanted, list) or not wanted:
        return
    now = list(dm.deltas)
    earlier = now[: now.index(name)]
    if [n for n in earlier if n in wanted] != list(wanted):
        warnings.warn(
            f"delta {name!r} was saved after {wanted} on the same modules, which do not commute with it (their "
            f"order changes the outputs), and is now attached after {earlier or 'none of them'}: load "
            f"{', '.join(map(repr, wanted))} first, in that order, or save them together with save_pretrained",
            stacklevel=4,
        )
