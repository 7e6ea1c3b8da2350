"""PEFT (IA)^3 folders in and out.

PEFT stores one vector per module as `<module>.ia3_l`, shaped (out, 1) when it rescales the
module's output and (1, in) when it rescales the input (PEFT's `feedforward_modules`); deltatune's
(IA)^3 keeps the same vectors flat and the same two sides (`feedforward`), so the mapping is a
renaming plus a reshape, and the shape tells the side.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from ..core.delta import safe_key
from ..core.layers import is_transposed
from ..core.model import DeltaModel
from ..methods.addition.ia3 import IA3Config
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

MARK = ".ia3_l"
# PEFT IA3Config fields (0.21) the import honors or that leave the outputs unchanged: feedforward_modules (the
# vectors' shapes say the side), fan_in_fan_out (the base weight's layout, not the vectors'), the init
FIELDS = TARGETING_FIELDS | {"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"}


@all_or_nothing
def import_peft_ia3(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", ignore_fields: Collection[str] = ()
) -> DeltaModel:
    """Attach a PEFT (IA)^3 adapter as a deltatune (IA)^3 delta (and copy its saved task head).

    `ignore_fields`: adapter_config.json fields unknown to this import that you know leave the outputs as they are."""
    config, adapter, head = read_adapter(folder, "IA3", lambda k: k.endswith(MARK), "ia3_l")
    adapter = rebase(model, adapter)
    check_fields(config, "(IA)^3", FIELDS, None, ignore_fields)
    vectors = {k.removesuffix(MARK): v for k, v in adapter.items()}
    bad = [m for m, v in vectors.items() if v.dim() != 2 or 1 not in v.shape]
    if bad:
        raise PeftFormatError(
            f"ia3_l of {bad[0]!r} has shape {tuple(vectors[bad[0]].shape)}; (n, 1) or (1, n) expected"
        )
    feedforward = tuple(m for m, v in vectors.items() if v.shape[0] == 1 and v.shape[1] != 1)
    dm = as_delta_model(model)
    check_modules(dm, vectors, PeftFormatError)  # the adapter's modules must exist, by their full names
    head = check_head(dm, head)
    add_imported(dm, name, IA3Config(targets=tuple(vectors), feedforward=feedforward))
    delta = dm.delta(name)
    with torch.no_grad():
        for module, v in vectors.items():
            target = delta.vectors[safe_key(module)]
            if target.numel() != v.numel():
                dm.detach(name)
                raise PeftFormatError(
                    f"{module}.ia3_l has {v.numel()} entries, this model needs {target.numel()}: another base model?"
                )
            target.copy_(v.reshape(-1))
    copy_head(dm, head, name)
    return dm


def export_peft_ia3(
    dm: DeltaModel, folder: str | os.PathLike, name: str = "default", include_head: bool | None = None
) -> Path:
    """Write an (IA)^3 delta as a PEFT adapter folder that `PeftModel.from_pretrained` loads."""
    delta = exported_delta(dm, name, ("ia3",), "(IA)^3", "IA3 format")
    tensors, heads = head_for_export(dm, PREFIX, include_head)
    modules, feedforward = list(delta.sites), []
    check_sites_outside_head(dm, modules, heads)
    for module in modules:
        vector = delta.vectors[safe_key(module)].detach()
        scales_input = delta._scales_input[safe_key(module)]
        tensors[PREFIX + module + MARK] = vector.reshape(1, -1) if scales_input else vector.reshape(-1, 1)
        if scales_input:
            feedforward.append(module)
    config = base_config(dm, "IA3", heads) | {
        "target_modules": modules,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": any(is_transposed(dm.backbone.get_submodule(m)) for m in modules),
        "init_ia3_weights": True,
    }
    return write_folder(folder, config, tensors)
