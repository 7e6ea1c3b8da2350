"""PEFT LoHa, LoKr, OFT, VeRA and AdaLoRA folders in and out.

Each of these stores per-module tensors under `base_model.model.<module>.<name>` that are, up to a
reshape, the tensors of deltatune's method of the same math (tests/test_new_methods.py checks the
outputs against PEFT's own layers), so a format is a table: which PEFT name is which of our tensors,
and how the settings translate. VeRA's shared projections are regenerated from the seed; a folder
whose saved projections differ from what that seed gives is refused rather than loaded wrongly.
Options without a deltatune equivalent (OFT's COFT or block sharing, LoKr's decompose_both, rank
patterns) are refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.delta import safe_key
from ..core.layers import is_transposed
from ..core.model import DeltaModel
from ..core.targeting import resolve
from ..methods import METHODS
from .peft_common import (
    PREFIX,
    WEIGHTS,
    PeftFormatError,
    as_delta_model,
    base_config,
    check_head,
    check_sites_outside_head,
    copy_head,
    head_for_export,
    read_folder,
    split,
    write_folder,
)


@dataclasses.dataclass(frozen=True)
class Format:
    method: str
    tensors: dict[str, str]  # our layer tensor -> PEFT's name under the module
    settings: Callable[[dict, dict], dict]  # (PEFT config, tensors per module) -> our settings
    export: Callable[[Any], dict]  # our config -> PEFT's settings
    refuse: tuple[str, ...] = ()  # PEFT options we cannot represent when truthy


def _oft_settings(c: dict, modules: dict) -> dict:
    version = tuple(int(v) for v in c.get("peft_version", "0.0.0").partition("@")[0].split(".")[:2] if v.isdigit())
    if c.get("use_cayley_neumann") and version < (0, 18):
        raise PeftFormatError(
            "this OFT adapter was saved before PEFT 0.18 with the Cayley-Neumann series, whose form changed then; "
            "deltatune computes the current one, so the outputs would differ: retrain it with PEFT >= 0.18"
        )
    n = next(iter(modules.values()))["weight"].shape[1]  # b(b-1)/2 numbers per block
    block = int(round((1 + math.sqrt(1 + 8 * n)) / 2))
    return {"block_size": block, "cayley_neumann": c.get("use_cayley_neumann", True),
            "neumann_terms": c.get("num_cayley_neumann_terms", 5)}  # fmt: skip


FORMATS = {
    "LOHA": Format(
        "loha",
        {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"},
        lambda c, m: {"r": c["r"], "alpha": float(c["alpha"])},
        lambda cfg: {"r": cfg.r, "alpha": cfg.alpha, "init_weights": True},
        ("rank_pattern", "alpha_pattern", "use_effective_conv2d"),
    ),
    "LOKR": Format(
        "lokr",
        {"w1": "lokr_w1", "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"},
        lambda c, m: {"r": c["r"], "alpha": float(c["alpha"]), "factor": c.get("decompose_factor", -1)},
        lambda cfg: {
            "r": cfg.r,
            "alpha": cfg.alpha,
            "decompose_factor": cfg.factor,
            "decompose_both": False,
            "init_weights": True,
        },  # fmt: skip
        ("rank_pattern", "alpha_pattern", "use_effective_conv2d", "decompose_both"),
    ),
    "OFT": Format(
        "oft",
        {"weight": "oft_R.weight"},
        _oft_settings,
        lambda cfg: {
            "r": 0,
            "oft_block_size": cfg.block_size,
            "use_cayley_neumann": cfg.cayley_neumann,
            "num_cayley_neumann_terms": cfg.neumann_terms,
            "coft": False,
            "block_share": False,
            "init_weights": True,
            "bias": "none",
            "peft_version": "0.18.0",
        },  # the series of PEFT >= 0.18
        ("coft", "block_share"),
    ),
    "VERA": Format(
        "vera",
        {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"},
        lambda c, m: {
            "r": c["r"],
            "seed": c.get("projection_prng_key", 0),
            "d_initial": c.get("d_initial", 0.1),
            "dropout": c.get("vera_dropout", 0.0),
        },  # fmt: skip
        lambda cfg: {
            "r": cfg.r,
            "projection_prng_key": cfg.seed,
            "d_initial": cfg.d_initial,
            "vera_dropout": cfg.dropout,
            "save_projection": True,
            "init_weights": True,
            "bias": "none",
        },  # fmt: skip
    ),
    "ADALORA": Format(
        "adalora",
        {"A": "lora_A", "B": "lora_B", "E": "lora_E"},
        lambda c, m: {
            "init_r": c["init_r"],
            "target_r": c["target_r"],
            "alpha": float(c.get("lora_alpha", 8)),
            "tinit": c.get("tinit", 0),
            "tfinal": c.get("tfinal", 0),
            "delta_t": c.get("deltaT", 1),
            "beta1": c.get("beta1", 0.85),
            "beta2": c.get("beta2", 0.85),
            "orth_weight": c.get("orth_reg_weight", 0.5),
            "dropout": c.get("lora_dropout", 0.0),
        },  # fmt: skip
        lambda cfg: {
            "init_r": cfg.init_r,
            "target_r": cfg.final_r,
            "lora_alpha": cfg.alpha,
            "tinit": cfg.tinit,
            "tfinal": cfg.tfinal,
            "deltaT": cfg.delta_t,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
            "orth_reg_weight": cfg.orth_weight,
            "lora_dropout": cfg.dropout,
            "total_step": cfg.tinit + cfg.tfinal + 1,
            "init_lora_weights": True,
            "bias": "none",
        },  # fmt: skip
    ),
}
BY_METHOD = {f.method: t for t, f in FORMATS.items()}


def import_peft_layers(model: nn.Module, folder: str | os.PathLike, name: str = "default") -> DeltaModel:
    """Attach a PEFT LoHa/LoKr/OFT/VeRA/AdaLoRA adapter as the deltatune delta of the same math."""
    folder = Path(folder)
    config, tensors = read_folder(folder)
    peft_type = config.get("peft_type")
    fmt = FORMATS.get(peft_type)
    if fmt is None:
        raise PeftFormatError(f"this is a PEFT {peft_type!r} adapter; this reader takes {', '.join(FORMATS)}")
    for option in fmt.refuse:
        if config.get(option):
            raise PeftFormatError(
                f"this {peft_type} adapter uses {option}; deltatune's {fmt.method} cannot represent it"
            )
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"this adapter also trains biases (bias={config['bias']!r}); import supports bias='none'")
    projections = {k: tensors.pop(k) for k in ("base_model.vera_A", "base_model.vera_B") if k in tensors}
    suffixes = {"." + theirs: ours for ours, theirs in fmt.tensors.items()}
    adapter, head = split(tensors, PREFIX, lambda k: any(k.endswith(s) for s in suffixes))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        suffix = next(s for s in suffixes if key.endswith(s))
        modules.setdefault(key[: -len(suffix)], {})[suffixes[suffix]] = value
    if not modules:
        raise PeftFormatError(f"{folder / WEIGHTS} holds no {peft_type} tensors")
    settings = fmt.settings(config, modules) | {"targets": tuple(modules)}
    dm = as_delta_model(model)
    resolve(dm.backbone, tuple(modules))  # the adapter's modules must exist: a TargetError names close ones
    check_head(dm, head)
    dm.add(name, METHODS[fmt.method](**settings))
    delta = dm.delta(name)
    try:
        _check_projections(delta, projections)
        with torch.no_grad():
            for module, saved in modules.items():
                layer = delta.layers[safe_key(module)]
                ours = {n for n, _ in layer.named_parameters()}
                if set(saved) != ours:
                    raise PeftFormatError(
                        f"{module} holds {sorted(saved)}; deltatune's {fmt.method} there has {sorted(ours)}"
                    )
                for part, value in saved.items():
                    target = layer.get_parameter(part)
                    if target.numel() != value.numel():
                        raise PeftFormatError(
                            f"{module}.{fmt.tensors[part]} has shape {tuple(value.shape)}, this model needs "
                            f"{tuple(target.shape)}: another base model?"
                        )
                    target.copy_(value.reshape(target.shape))
    except PeftFormatError:
        dm.detach(name)
        raise
    copy_head(dm, head)
    return dm


def _check_projections(delta: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for key, value in saved.items():
        ours = getattr(delta, key.removeprefix("base_model."))
        if ours.shape != value.shape or not torch.equal(ours.cpu(), value.to(ours.dtype)):
            raise PeftFormatError(
                f"the adapter's {key} is not what its projection_prng_key regenerates here; "
                "deltatune's VeRA keeps only the seed, so it cannot load these projections"
            )


def export_peft_layers(
    dm: DeltaModel, folder: str | os.PathLike, name: str = "default", include_head: bool = True
) -> Path:
    """Write a LoHa/LoKr/OFT/VeRA/AdaLoRA delta as a PEFT adapter folder `PeftModel.from_pretrained` loads."""
    delta = dm.delta(name)
    peft_type = BY_METHOD.get(delta.config.method)
    if peft_type is None:
        raise PeftFormatError(f"{delta.config.method} is not one of {', '.join(BY_METHOD)}")
    fmt = FORMATS[peft_type]
    tensors, heads = head_for_export(dm, PREFIX, include_head)
    check_sites_outside_head(dm, delta.sites, heads)
    for key, layer in delta.layers.items():
        module = delta._names[key]
        for part, param in layer.named_parameters():
            tensors[f"{PREFIX}{module}.{fmt.tensors[part]}"] = param.detach()
    if peft_type == "VERA":
        tensors |= {"base_model.vera_A": delta.vera_A, "base_model.vera_B": delta.vera_B}
    config = base_config(dm, peft_type, heads) | fmt.export(delta.config)
    config["target_modules"] = list(delta.sites)
    config["fan_in_fan_out"] = any(is_transposed(dm.backbone.get_submodule(m)) for m in delta.sites)
    return write_folder(folder, config, tensors)
