"""PEFT LN tuning folders in and out.

PEFT trains a copy of each chosen norm layer and saves its weight and bias whole
(`<module>.ln_tuning_layers.weight`); deltatune's layernorm tuning trains a difference D on top of
the frozen W. Importing stores D = W_peft - W, exporting writes W + D: exact up to one float
rounding of the subtraction, far inside the 1e-5 the tests ask for.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from ..core.model import DeltaModel
from ..methods.specification.layernorm import LayerNormConfig
from .peft_common import (
    PREFIX,
    TARGETING_FIELDS,
    PeftFormatError,
    add_imported,
    as_delta_model,
    base_config,
    check_fields,
    check_head,
    check_sites_outside_head,
    copy_head,
    exported_delta,
    head_for_export,
    read_adapter,
    write_folder,
)
from .peft_names import all_or_nothing, check_modules, rebase

MARK = ".ln_tuning_layers."
FIELDS = TARGETING_FIELDS  # LNTuningConfig (0.21) has no other field than the common ones


@all_or_nothing
def import_peft_ln(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", ignore_fields: Collection[str] = ()
) -> DeltaModel:
    """Attach a PEFT LN tuning adapter as a deltatune layernorm delta (and copy its saved task head).

    `ignore_fields`: adapter_config.json fields unknown to this import that you know leave the outputs as they are."""
    config, adapter, head = read_adapter(folder, "LN_TUNING", lambda k: MARK in k, "ln_tuning_layers")
    adapter = rebase(model, adapter)
    check_fields(config, "LN tuning", FIELDS, None, ignore_fields)
    trained = {k.replace(MARK, "."): v for k, v in adapter.items()}  # "<module>.<param>"
    modules = tuple(sorted({k.rsplit(".", 1)[0] for k in trained}))
    dm = as_delta_model(model)
    check_modules(dm, modules, PeftFormatError)
    head = check_head(dm, head)
    add_imported(dm, name, LayerNormConfig(targets=modules))
    delta = dm.delta(name)
    here = {ref.name: key for key, ref in delta._refs.items()}
    if set(here) != set(trained):
        dm.detach(name)
        raise PeftFormatError(
            f"the adapter trains {sorted(set(trained) - set(here))[:4]} that deltatune's layernorm tuning of "
            f"{list(modules)[:3]} does not, or the other way round ({sorted(set(here) - set(trained))[:4]})"
        )
    with torch.no_grad():
        for pname, value in trained.items():
            key = here[pname]
            original = delta._original(dm.backbone, key)
            if original.shape != value.shape:
                dm.detach(name)
                raise PeftFormatError(
                    f"{pname} has shape {tuple(value.shape)} in the adapter, here {tuple(original.shape)}"
                )
            delta.delta[key].copy_(value.to(original.dtype) - original)
    copy_head(dm, head, name)
    return dm


def export_peft_ln(
    dm: DeltaModel, folder: str | os.PathLike, name: str = "default", include_head: bool | None = None
) -> Path:
    """Write a layernorm delta as a PEFT LN tuning folder (W + D per parameter)."""
    delta = exported_delta(dm, name, ("layernorm",), "layernorm", "LN_TUNING")
    # the file holds whole norm weights, read from the backbone: a merged delta is in them already (the export
    # wrote W + 2D for its own merged delta, with no error), and another merged delta is not this adapter's
    dm._refuse_while_merged(f"export {name!r} as PEFT LN tuning (its file holds whole norm weights)")
    tensors, heads = head_for_export(dm, PREFIX, include_head)
    modules = set()
    with torch.no_grad():
        for key, ref in delta._refs.items():
            value = delta._original(dm.backbone, key) + delta.merge_value(key).to(ref.dtype)
            tensors[f"{PREFIX}{ref.module}{MARK}{ref.param}"] = value
            modules.add(ref.module)
    check_sites_outside_head(dm, modules, heads)
    config = base_config(dm, "LN_TUNING", heads) | {"target_modules": sorted(modules)}
    return write_folder(folder, config, tensors)
