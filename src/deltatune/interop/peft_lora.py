"""PEFT LoRA folders in and out, rsLoRA, `rank_pattern` and `alpha_pattern` included.

Both layouts store A as (r, in) and B as (out, r) per module (GPT-2's Conv1D included: PEFT marks
it with `fan_in_fan_out`), so the mapping is a renaming; what needs care is the scaling (rsLoRA
uses alpha / sqrt(r), ours alpha / r, so alpha is multiplied by sqrt(r)), the per-module ranks and
alphas (read from the tensors and PEFT's pattern rule, kept as exact per-module patterns), the
task head PEFT saves as `modules_to_save`, and refusing what we cannot represent (trained biases,
...) instead of loading it wrongly. DoRA (`use_dora`) is LoRA plus `lora_magnitude_vector` per module.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.delta import safe_key
from ..core.layers import is_transposed
from ..core.model import DeltaModel
from ..methods.reparameterization.dora import DoRAConfig
from ..methods.reparameterization.lora import LoRAConfig, pattern_value
from .peft_common import (
    PREFIX,
    TARGETING_FIELDS,
    WEIGHTS,
    PeftFormatError,
    add_imported,
    as_delta_model,
    base_config,
    check_bias,
    check_fields,
    check_head,
    check_sites_outside_head,
    copy_head,
    head_for_export,
    read_folder,
    split,
    write_folder,
)
from .peft_init import initial_offset, residual_kind
from .peft_names import all_or_nothing, check_modules, rebase

_UNSUPPORTED = {
    "lora_bias": "trained LoRA biases",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# PEFT LoraConfig fields (0.21, astra_config 0.22) that import honors (r, alphas, rsLoRA, DoRA, dropout, bias 'none', the head,
# fan_in_fan_out: the same tensor layout) or that leave a trained adapter's outputs unchanged: metadata,
# targeting (the tensors name the modules), initialisation (peft_init reads init_lora_weights) and
# training-time settings
_KNOWN = TARGETING_FIELDS | {
    "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "use_dora", "velora_config", "qalora_group_size", "runtime_config",
    "ensure_weight_tying", "astra_config",
}  # fmt: skip


def peft_alpha(config: dict, r: int, module: str | None = None) -> float:
    """deltatune's alpha (its scale is alpha / r) for a module of rank `r` under a PEFT LoRA config: the module's
    `alpha_pattern` entry (PEFT's rule), and rsLoRA's scale alpha / sqrt(r) written as alpha * sqrt(r) / r."""
    alpha = float(config.get("lora_alpha", config["r"]))
    if module is not None:
        alpha = float(pattern_value(config.get("alpha_pattern"), module, alpha))
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def lora_config(
    config: dict, targets: Any, r: int, alpha: float, per_module: dict[str, tuple[int, float]]
) -> LoRAConfig:
    """PEFT's LoRA (or DoRA) as deltatune's config: each module's (rank, alpha) that differs from (r, alpha) kept
    as an exact per-module pattern. Used by the folder import and by `attach(model, peft.LoraConfig(...))`."""
    ranks = {re.escape(m): r_m for m, (r_m, _) in per_module.items() if r_m != r}
    alphas = {re.escape(m): a_m for m, (_, a_m) in per_module.items() if a_m != alpha}
    return (DoRAConfig if config.get("use_dora") else LoRAConfig)(
        targets=targets,
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        rank_pattern=ranks or None,
        alpha_pattern=alphas or None,
    )


def _check(config: dict, ignore_fields: tuple[str, ...] = ()) -> None:
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"this is a PEFT {config.get('peft_type')!r} adapter, not LoRA; use import_peft")
    check_fields(config, "LoRA", _KNOWN, _UNSUPPORTED, ignore_fields)
    check_bias(config)


# PEFT's tensor names per factor: a linear layer's, an embedding table's (lora_embedding_*), DoRA's magnitude
_MARKERS = (
    ("A", ".lora_A.weight"),
    ("B", ".lora_B.weight"),
    ("A", ".lora_embedding_A"),
    ("B", ".lora_embedding_B"),
    ("m", ".lora_magnitude_vector"),
)


@all_or_nothing
def import_peft_lora(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", ignore_fields: tuple[str, ...] = ()
) -> DeltaModel:
    """Attach a PEFT LoRA adapter as a deltatune LoRA delta (and copy its saved task head).

    `ignore_fields`: adapter_config.json fields this import does not know that you know leave the outputs as
    they are (otherwise refused). A PiSSA or OLoRA adapter becomes a LoRA of twice its rank that also undoes
    its init's change to the base weights (see peft_init)."""
    folder = Path(folder)
    config, tensors = read_folder(folder)
    _check(config, tuple(ignore_fields))
    residual = residual_kind(config, tuple(ignore_fields))
    dora = bool(config.get("use_dora"))
    adapter, head = split(tensors, PREFIX, lambda k: ".lora_" in k)
    adapter = rebase(model, adapter)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        if key.endswith(".lora_velora_embed"):  # VeLoRA's activation compression: training only, not in outputs
            continue
        for part, marker in _MARKERS:
            if key.endswith(marker):
                factors.setdefault(key[: -len(marker)], {})[part] = value
                break
        else:
            raise PeftFormatError(f"{WEIGHTS} holds {key!r}, a LoRA tensor deltatune does not know")
    if not factors:
        raise PeftFormatError(f"{folder / WEIGHTS} holds no lora_A/lora_B tensors")
    broken = sorted(m for m, f in factors.items() if set(f) != ({"A", "B", "m"} if dora else {"A", "B"}))
    if broken:
        raise PeftFormatError(f"modules with only one LoRA factor in {WEIGHTS}: {broken[:4]}")
    dm = as_delta_model(model)
    check_modules(dm, factors, PeftFormatError)  # the adapter's modules must exist, by their full names
    grow = 2 if residual else 1
    r = int(config["r"])
    per_module = {}
    for module, f in factors.items():
        r_m = int(f["A"].shape[0])
        alpha_m = peft_alpha(config, r_m, module)
        layer = dm.backbone.get_submodule(module)
        # r_m more terms at the same scale alpha_m / r_m that undo the init's offset; PEFT's PiSSA/OLoRA init leaves
        # an embedding's LoRA plain (an SVD of the table failed on "Sizes of tensors must match")
        if residual and not isinstance(layer, nn.Embedding):
            p, q = initial_offset(layer.weight, residual, r_m, alpha_m / r_m, is_transposed(layer))
            f["A"] = torch.cat([f["A"], q.to(f["A"].dtype)])
            f["B"] = torch.cat([f["B"], (-p * r_m / alpha_m).to(f["B"].dtype)], dim=1)
            r_m, alpha_m = grow * r_m, grow * alpha_m
        per_module[module] = (r_m, alpha_m)
    lora = lora_config(config, tuple(factors), r * grow, peft_alpha(config, r) * grow, per_module)
    head = check_head(dm, head)
    add_imported(dm, name, lora)
    delta = dm.delta(name)
    with torch.no_grad():
        for module, f in factors.items():
            layer = delta.layers[safe_key(module)]
            for part in f:
                target = layer.magnitude if part == "m" else getattr(layer.lora if dora else layer, part)
                if target.shape != f[part].shape:
                    dm.detach(name)
                    raise PeftFormatError(
                        f"{module}.lora_{part} has shape {tuple(f[part].shape)}, "
                        f"this model needs {tuple(target.shape)}: another base model?"
                    )
                target.copy_(f[part])
    copy_head(dm, head, name)
    return dm


def export_peft_lora(
    dm: DeltaModel, folder: str | os.PathLike, name: str = "default", include_head: bool | None = None
) -> Path:
    """Write a LoRA delta as a PEFT adapter folder that `PeftModel.from_pretrained` loads."""
    delta = dm.delta(name)
    if delta.config.method not in ("lora", "dora"):
        raise PeftFormatError(
            f"only LoRA and DoRA deltas export to PEFT's LoRA format; {name!r} is {delta.config.method}"
        )
    dora = delta.config.method == "dora"
    cfg: LoRAConfig = delta.config
    modules = list(delta.sites)
    tensors, heads = head_for_export(dm, PREFIX, include_head)
    check_sites_outside_head(dm, modules, heads)
    rank_pattern, alpha_pattern = {}, {}
    for module in modules:
        layer = delta.layers[safe_key(module)]
        factors = layer.lora if dora else layer
        table = isinstance(dm.backbone.get_submodule(module), nn.Embedding)  # PEFT's names for an embedding's
        tensors[f"{PREFIX}{module}.lora_{'embedding_A' if table else 'A.weight'}"] = factors.A
        tensors[f"{PREFIX}{module}.lora_{'embedding_B' if table else 'B.weight'}"] = factors.B
        if dora:
            tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = layer.magnitude
        r_m, alpha_m = cfg.rank_alpha(module)
        if r_m != cfg.r:
            rank_pattern[re.escape(module)] = r_m
        if alpha_m != cfg.alpha:
            alpha_pattern[re.escape(module)] = alpha_m
    config = base_config(dm, "LORA", heads) | {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "fan_in_fan_out": any(is_transposed(dm.backbone.get_submodule(m)) for m in modules),
        "bias": "none",
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return write_folder(folder, config, tensors)
