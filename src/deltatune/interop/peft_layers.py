"""PEFT LoHa, LoKr, OFT, VeRA and AdaLoRA folders in and out.

Each of these stores per-module tensors under `base_model.model.<module>.<name>` that are, up to a
reshape, the tensors of deltatune's method of the same math (tests/test_new_methods_peft.py checks the
outputs against PEFT's own layers), so a format is a table: which PEFT name is which of our tensors,
how the settings translate, and which config fields are honored, leave a trained adapter's outputs
unchanged, or change them beyond what deltatune represents (refused by name; any other set field is
refused as possibly a later PEFT's, see peft_common.check_fields). VeRA's shared projections are
regenerated from the seed; a folder whose saved projections differ from what that seed gives is
refused rather than loaded wrongly. A tensor of the method that deltatune has no place for (LoKr's
decompose_both factors, conv kernels) is refused naming the option that made it. AdaLoRA saved after
rank allocation holds only the kept ranks; they are put back among init_r with the pruned ones zero.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.delta import safe_key
from ..core.layers import is_transposed, linear_dims
from ..core.model import DeltaModel
from ..methods import METHODS
from ..methods.reparameterization.oft import nearest_divisor
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
from .peft_names import all_or_nothing, check_modules, rebase

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Format:
    method: str
    title: str  # the method's name in messages
    tensors: dict[str, str]  # our layer tensor -> PEFT's name under the module
    settings: Callable[[dict, dict[str, Tensors], nn.Module], dict]  # (PEFT config, tensors per module, model)
    export: Callable[[Any], dict]  # our config -> PEFT's settings
    known: frozenset[str]  # fields honored, or without effect on a trained adapter's outputs
    refuse: Mapping[str, str] = dataclasses.field(default_factory=dict)  # field -> what it is (changes outputs)
    marker: str = ""  # what every PEFT tensor name of this method holds
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)  # PEFT tensor we lack -> the option behind it
    full: Callable[[dict, str, Tensors], Tensors] | None = None  # a module's saved tensors at our shapes


def _oft_settings(c: dict, modules: dict[str, Tensors], model: nn.Module) -> dict:
    """One block size for all modules: PEFT's `oft_block_size`, moved per layer to the nearest divisor of
    its width as deltatune's OFT does too, or with `r` (blocks per layer) the size its tensors show."""
    version = tuple(int(v) for v in c.get("peft_version", "0.0.0").partition("@")[0].split(".")[:2] if v.isdigit())
    if c.get("use_cayley_neumann") and version < (0, 18):
        raise PeftFormatError(
            "this OFT adapter was saved before PEFT 0.18 with the Cayley-Neumann series, whose form changed then; "
            "deltatune computes the current one, so the outputs would differ: retrain it with PEFT >= 0.18"
        )
    blocks, widths = {}, {}
    for module, saved in modules.items():
        if "weight" not in saved:
            continue  # import_peft_layers names the missing tensor
        n = saved["weight"].shape[1]  # b(b-1)/2 numbers per block
        blocks[module] = int(round((1 + math.sqrt(1 + 8 * n)) / 2))
        layer = model.get_submodule(module)
        try:
            widths[module] = linear_dims(layer)[0]
        except TypeError as err:
            raise PeftFormatError(f"this OFT adapter rotates {module!r}, a {type(layer).__name__}: {err}") from err
    candidates = ([int(c["oft_block_size"])] if c.get("oft_block_size") else []) + sorted(set(blocks.values()))
    block = next((b for b in candidates if all(nearest_divisor(widths[m], b) == blocks[m] for m in blocks)), None)
    if block is None:
        shown = ", ".join(f"{m} ({widths[m]} wide): {blocks[m]}" for m in list(blocks)[:3])
        raise PeftFormatError(
            f"this OFT adapter has r={c.get('r')} blocks per layer, so its block sizes differ by layer width ({shown}); "
            "deltatune's OFT has one block size per delta: retrain with oft_block_size (and r=0)"
        )
    return {"block_size": block, "cayley_neumann": c.get("use_cayley_neumann", True),
            "neumann_terms": c.get("num_cayley_neumann_terms", 5)}  # fmt: skip


def _adalora_settings(c: dict, modules: dict[str, Tensors], model: nn.Module) -> dict:
    alpha = float(c.get("lora_alpha", 8))
    return {
        "init_r": c["init_r"],
        "target_r": c["target_r"],
        "alpha": alpha if alpha > 0 else float(c["init_r"]),  # PEFT: lora_alpha if lora_alpha > 0 else r
        "tinit": c.get("tinit", 0),
        "tfinal": c.get("tfinal", 0),
        "delta_t": c.get("deltaT", 1),
        "beta1": c.get("beta1", 0.85),
        "beta2": c.get("beta2", 0.85),
        "orth_weight": c.get("orth_reg_weight", 0.5),
        "dropout": c.get("lora_dropout", 0.0),
    }


def _adalora_full(c: dict, module: str, saved: Tensors) -> Tensors:
    """PEFT saves an AdaLoRA whose ranks were allocated (`rank_pattern`, a kept-mask per module) with only the
    kept triplets: E and A rows, B columns. It reloads them keeping the scaling of all init_r ranks, so at
    init_r, with the pruned triplets zero, they compute the same and deltatune's ranks() reads the allocation."""
    masks = {k.split(".lora_E")[0]: v for k, v in (c.get("rank_pattern") or {}).items()}
    init_r = int(c["init_r"])
    if module not in masks or set(saved) != {"A", "B", "E"} or saved["E"].shape[0] == init_r:
        return saved
    mask = torch.tensor(masks[module], dtype=torch.bool).reshape(-1)
    if mask.numel() != init_r or int(mask.sum()) != saved["E"].shape[0]:
        raise PeftFormatError(
            f"rank_pattern keeps {int(mask.sum())} of {mask.numel()} ranks of {module!r}, whose tensors hold "
            f"{saved['E'].shape[0]} of init_r={init_r}: the config and the weights disagree"
        )
    e, a, b = (saved[k] for k in "EAB")
    full = {
        "E": e.new_zeros(init_r, *e.shape[1:]),
        "A": a.new_zeros(init_r, a.shape[1]),
        "B": b.new_zeros(b.shape[0], init_r),
    }
    full["E"][mask], full["A"][mask], full["B"][:, mask] = e, a, b
    return full


# Config fields (PEFT 0.21, 0.22) each import honors or that leave a trained adapter's outputs unchanged (metadata,
# targeting: the tensors name the modules, initialisation, training-only settings); see check_fields.
# LoHa/LoKr: rank_dropout, module_dropout, rank_dropout_scale act in training only; use_effective_conv2d on conv
# layers only (their kernel tensors are refused); LoKr's decompose_both splits W1 only where r is below half its
# size, which the tensors show (lokr_w1_a, refused). OFT: module_dropout is built but never applied, eps is
# COFT's. VeRA: save_projection either way, the projections come from the key (saved ones are compared).
_LYCORIS = TARGETING_FIELDS | {"r", "alpha", "rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d"}
_LOKR = _LYCORIS | {"rank_dropout_scale", "decompose_both", "decompose_factor"}
_OFT = TARGETING_FIELDS | {"r", "oft_block_size", "module_dropout", "fan_in_fan_out", "bias", "init_weights", "eps",
                           "use_cayley_neumann", "num_cayley_neumann_terms"}  # fmt: skip
_VERA = TARGETING_FIELDS | {"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                            "fan_in_fan_out", "bias", "init_weights"}  # fmt: skip
# AdaLoraConfig is a LoraConfig: r (init_r rules), use_rslora, alpha_pattern, the init configs and the LoRA
# variants are ignored by PEFT's AdaLoRA layers (each probed: outputs unchanged on PEFT 0.21.2)
_ADALORA = TARGETING_FIELDS | {
    "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "runtime_config", "lora_bias", "use_bdlora", "arrow_config", "kasa_config",
    "ensure_weight_tying", "astra_config", "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
    "total_step",
}  # fmt: skip
# ... and what PEFT applies to the whole model (LoraModel), whatever the layers: refused
_ADALORA_REFUSED = {"use_dora": "DoRA", "layer_replication": "layer replication",
                    "trainable_token_indices": "trainable tokens",
                    "target_parameters": "adapters on parameters (target_parameters)"}  # fmt: skip
_PATTERNS = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas"}
_CONV = "use_effective_conv2d (a convolution's kernel factor)"
_W1 = "decompose_both (W1 as a low-rank product)"


def _lokr_export(cfg: Any) -> dict:
    return {"r": cfg.r, "alpha": cfg.alpha, "decompose_factor": cfg.factor, "decompose_both": False,
            "init_weights": True}  # fmt: skip


def _oft_export(cfg: Any) -> dict:
    return {"r": 0, "oft_block_size": cfg.block_size, "use_cayley_neumann": cfg.cayley_neumann,
            "num_cayley_neumann_terms": cfg.neumann_terms, "coft": False, "block_share": False,
            "init_weights": True, "bias": "none", "peft_version": "0.18.0"}  # the series of PEFT >= 0.18  # fmt: skip


def _vera_settings(c: dict, modules: dict[str, Tensors], model: nn.Module) -> dict:
    return {"r": c["r"], "seed": c.get("projection_prng_key", 0), "d_initial": c.get("d_initial", 0.1),
            "dropout": c.get("vera_dropout", 0.0)}  # fmt: skip


def _vera_export(cfg: Any) -> dict:
    return {"r": cfg.r, "projection_prng_key": cfg.seed, "d_initial": cfg.d_initial, "vera_dropout": cfg.dropout,
            "save_projection": True, "init_weights": True, "bias": "none"}  # fmt: skip


def _adalora_export(cfg: Any) -> dict:
    return {"init_r": cfg.init_r, "target_r": cfg.final_r, "lora_alpha": cfg.alpha, "tinit": cfg.tinit,
            "tfinal": cfg.tfinal, "deltaT": cfg.delta_t, "beta1": cfg.beta1, "beta2": cfg.beta2,
            "orth_reg_weight": cfg.orth_weight, "lora_dropout": cfg.dropout,
            "total_step": cfg.tinit + cfg.tfinal + 1, "init_lora_weights": True, "bias": "none"}  # fmt: skip


FORMATS = {
    "LOHA": Format(
        "loha",
        "LoHa",
        {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"},
        lambda c, m, model: {"r": c["r"], "alpha": float(c["alpha"])},
        lambda cfg: {"r": cfg.r, "alpha": cfg.alpha, "init_weights": True},
        _LYCORIS,
        _PATTERNS,
        "hada_",
        {"hada_t1": _CONV, "hada_t2": _CONV},
    ),
    "LOKR": Format(
        "lokr",
        "LoKr",
        {"w1": "lokr_w1", "w2": "lokr_w2", "w2a": "lokr_w2_a", "w2b": "lokr_w2_b"},
        lambda c, m, model: {"r": c["r"], "alpha": float(c["alpha"]), "factor": c.get("decompose_factor", -1)},
        _lokr_export,
        _LOKR,
        _PATTERNS,
        "lokr_",
        {"lokr_w1_a": _W1, "lokr_w1_b": _W1, "lokr_t2": _CONV},
    ),
    "OFT": Format(
        "oft",
        "OFT",
        {"weight": "oft_R.weight"},
        _oft_settings,
        _oft_export,
        _OFT,
        {"coft": "constrained OFT", "block_share": "block sharing"},
        "oft_",
    ),
    "VERA": Format(
        "vera",
        "VeRA",
        {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"},
        _vera_settings,
        _vera_export,
        _VERA,
        marker="vera_lambda_",
    ),
    "ADALORA": Format(
        "adalora",
        "AdaLoRA",
        {"A": "lora_A", "B": "lora_B", "E": "lora_E"},
        _adalora_settings,
        _adalora_export,
        _ADALORA,
        _ADALORA_REFUSED,
        "lora_",
        full=_adalora_full,
    ),
}
BY_METHOD = {f.method: t for t, f in FORMATS.items()}


def _modules(fmt: Format, adapter: Tensors) -> dict[str, Tensors]:
    """{module: {our tensor name: tensor}}; a tensor of the method we have no place for is refused by name."""
    suffixes = {"." + theirs: ours for ours, theirs in fmt.tensors.items()}
    modules: dict[str, Tensors] = {}
    for key, value in adapter.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            option = next((why for name, why in fmt.extra.items() if f".{name}" in key), None)
            what = f"made by {option}, which" if option else f"a {fmt.title} tensor"
            raise PeftFormatError(f"{WEIGHTS} holds {key!r}, {what} deltatune's {fmt.title} cannot represent")
        modules.setdefault(key[: -len(suffix)], {})[suffixes[suffix]] = value
    return modules


@all_or_nothing
def import_peft_layers(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", ignore_fields: Collection[str] = ()
) -> DeltaModel:
    """Attach a PEFT LoHa/LoKr/OFT/VeRA/AdaLoRA adapter as the deltatune delta of the same math.

    `ignore_fields`: adapter_config.json fields this import does not know that you know leave the outputs as
    they are (otherwise refused)."""
    folder = Path(folder)
    config, tensors = read_folder(folder)
    peft_type = config.get("peft_type")
    fmt = FORMATS.get(peft_type)
    if fmt is None:
        raise PeftFormatError(f"this is a PEFT {peft_type!r} adapter; this reader takes {', '.join(FORMATS)}")
    check_fields(config, fmt.title, fmt.known, fmt.refuse, ignore_fields)
    check_bias(config)
    projections = {k: tensors.pop(k) for k in ("base_model.vera_A", "base_model.vera_B") if k in tensors}
    adapter, head = split(tensors, PREFIX, lambda k: fmt.marker in k)
    adapter = rebase(model, adapter)
    modules = _modules(fmt, adapter)
    if not modules:
        raise PeftFormatError(f"{folder / WEIGHTS} holds no {peft_type} tensors")
    dm = as_delta_model(model)
    check_modules(dm, modules, PeftFormatError)  # the adapter's modules must exist, by their full names
    settings = fmt.settings(config, modules, dm.backbone) | {"targets": tuple(modules)}
    head = check_head(dm, head)
    add_imported(dm, name, METHODS[fmt.method](**settings))
    delta = dm.delta(name)
    try:
        _check_projections(delta, projections)
        with torch.no_grad():
            for module, saved in modules.items():
                saved = fmt.full(config, module, saved) if fmt.full else saved
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
    copy_head(dm, head, name)
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
    dm: DeltaModel, folder: str | os.PathLike, name: str = "default", include_head: bool | None = None
) -> Path:
    """Write a LoHa/LoKr/OFT/VeRA/AdaLoRA delta as a PEFT adapter folder `PeftModel.from_pretrained` loads."""
    delta = dm.delta(name)
    peft_type = BY_METHOD.get(delta.config.method)
    if peft_type is None:
        raise PeftFormatError(f"{delta.config.method} is not one of {', '.join(BY_METHOD)}")
    fmt = FORMATS[peft_type]
    transposed = [m for m in delta.sites if is_transposed(dm.backbone.get_submodule(m))]
    if transposed and peft_type in ("LOHA", "LOKR", "OFT"):  # PEFT's layers for these take nn.Linear only
        raise PeftFormatError(
            f"PEFT's {peft_type} layers do not take GPT-2-style Conv1D modules ({transposed[0]}): the folder would "
            "not load in PEFT; save it with dm.save_pretrained(folder), or export a LoRA delta"
        )
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
