"""AdapterHub (`adapters` library) adapter folders in, with AdapterHub's outputs exactly.

What maps (BERT-style blocks: a sublayer output module holding `dense` and `LayerNorm`, as in BERT,
RoBERTa, XLM-R, ELECTRA; AdapterHub's bottleneck hook there computes, with h the projection's output
and x the sublayer's residual input):

* `seq_bn` (Pfeiffer; original_ln_before, residual_before_ln): LN(h + x + ad(LN(h + x))) ->
  `norm_adapter` on the block's `LayerNorm` (its input is h + x);
* `double_seq_bn` (Houlsby) and any sequential bottleneck with original_ln_before=False: LN(h + ad(h) + x)
  -> `adapter` on `dense` (attention and/or FFN: mh_adapter, output_adapter);
* `par_bn` (is_parallel): LN(h + ad(x) + x) with x the FFN's input -> `parallel_adapter`;
* `lora` (composition_mode "add"): W x + b + (alpha / r) B A x -> `lora` on the modules the tensors name;
* `ia3` (LoRA with composition_mode "scale", r=1): (W x + b) * alpha * l -> `ia3` scaling those outputs
  (AdapterHub's intermediate_lora scales the FFN's first projection's output, before the activation).

Everything else is refused in one line naming it: prefix and prompt tuning, ReFT, unions (MAM, UniPELT),
AdapterFusion, gating, PHM (Compacter), invertible adapters, extra LayerNorms, learned scalings, per-layer
reduction factors, DoRA, VeRA, activations deltatune's bottleneck has not. `leave_out` is honored (the
tensors name the layers; they must cover exactly the others).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from ..core.delta import DeltaConfig, safe_key
from ..core.model import DeltaModel
from ..core.targeting import layer_index
from ..methods.addition.adapter import AdapterConfig
from ..methods.addition.ia3 import IA3Config
from ..methods.addition.norm_adapter import NormAdapterConfig
from ..methods.addition.parallel_adapter import ParallelAdapterConfig
from ..methods.reparameterization.lora import LoRAConfig
from .adapterhub_common import (
    AdapterHubFormatError,
    check_backbone,
    check_fields,
    check_layers,
    import_head,
    n_layers,
    place,
    read_folder,
)

# AdapterHub's activation names (lower-cased, as it reads them; transformers' ACT2FN) -> deltatune's bottleneck's.
# The GELU variants are the same functions (float64 over [-12, 12]: 9e-13 for gelu_fast's rounded constant, <= 2e-15
# for the others; float32 rounding 2.4e-7); gelu_10 (clipped) and quick_gelu (x sigmoid(1.702 x)) are others.
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_python": "gelu", "tanh": "tanh", "swish": "silu", "silu": "silu",
               "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
               "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh"}  # fmt: skip
REFUSED_ARCHITECTURES = {
    "prefix_tuning": "prefix tuning",
    "prompt_tuning": "prompt tuning",
    "union": "a union of methods (MAM adapter, UniPELT, ...)",
    "mtl_lora": "multi-task LoRA",
    "reft": "ReFT",
}
BN_HONORED = frozenset(
    {"mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before", "is_parallel",
     "residual_before_ln", "scaling", "leave_out", "adapter_residual_before_ln",  # the latter acts only with ln_after
     # PHM and invertible-adapter settings act only with phm_layer / inv_adapter, refused below
     "phm_dim", "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm",
     "hypercomplex_nonlinearity", "phm_rank", "phm_bias", "factorized_phm_W", "shared_W_phm",
     "inv_adapter_reduction_factor"}
)  # fmt: skip
BN_REQUIRED = {
    "original_ln_after": (True, "no residual and LayerNorm after the adapter (original_ln_after=False)"),
    "ln_before": (False, "a LayerNorm of its own before the adapter"),
    "ln_after": (False, "a LayerNorm of its own after the adapter"),
    "use_gating": (False, "gating"),
    "phm_layer": (False, "PHM layers (Compacter)"),
    "inv_adapter": (None, "invertible adapters"),
    "cross_adapter": (False, "cross-attention adapters"),
}
LORA_HONORED = frozenset(
    {"selfattn_lora", "intermediate_lora", "output_lora", "attn_matrices", "leave_out", "r", "alpha", "dropout",
     "composition_mode"}
)  # fmt: skip
LORA_REQUIRED = {
    "use_gating": (False, "gating"),
    "use_dora": (False, "AdapterHub's DoRA"),
    "vera_d": (None, "VeRA"),
    "vera_b": (None, "VeRA"),
    "dtype": (None, "LoRA weights of their own dtype"),
}
_BN_KEY = re.compile(r"^(.+)\.adapters\.[^.]+\.(adapter_down\.0|adapter_up)\.(weight|bias)$")
_LORA_KEY = re.compile(r"^(.+)\.loras\.[^.]+\.(lora_A|lora_B)$")


def import_adapterhub(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str | None = None,
    head: bool = True,
    ignore_fields: Collection[str] = (),
) -> DeltaModel:
    """Attach the AdapterHub adapter saved in `folder` (`model.save_adapter`) to `model` as a deltatune delta.

    `name`: the delta's name (default: the adapter's own). `head`: also copy a saved head when it is the
    model's own classifier (same names and shapes); another head is left out with a warning.
    `ignore_fields`: config fields unknown to this import, or training-only ones (dropout) deltatune's
    method has not, that you know leave the outputs as they are (otherwise refused)."""
    folder = Path(folder)
    meta, config, tensors = read_folder(folder)
    architecture = config.get("architecture") or "bottleneck"
    if architecture in REFUSED_ARCHITECTURES:
        raise AdapterHubFormatError(
            f"this AdapterHub adapter is {REFUSED_ARCHITECTURES[architecture]} ({architecture}), which deltatune "
            "does not import; importable: bottleneck adapters (seq_bn, double_seq_bn, par_bn), lora, ia3"
        )
    if architecture not in ("bottleneck", "lora"):
        raise AdapterHubFormatError(f"unknown AdapterHub architecture {architecture!r}; importable: bottleneck, lora")
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    check_backbone(meta, dm.backbone)
    name = name or meta.get("name") or "default"
    if architecture == "bottleneck":
        delta_config, values = _bottleneck(dm.backbone, config, tensors, tuple(ignore_fields))
    else:
        delta_config, values = _lora(dm.backbone, config, tensors, tuple(ignore_fields))
    dm.add(name, delta_config)
    try:
        _copy(dm, name, values)
    except AdapterHubFormatError:
        dm.detach(name)
        raise
    import_head(dm, folder, head)
    return dm


def _bottleneck(
    model: nn.Module, config: dict, tensors: dict, ignore: tuple[str, ...]
) -> tuple[DeltaConfig, dict[str, dict[str, torch.Tensor]]]:
    what = "bottleneck adapter"
    check_fields(config, what, BN_HONORED, BN_REQUIRED, {"dropout": 0.0, "stochastic_depth": 0.0}, ignore)
    scaling = config.get("scaling", 1.0)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or scaling <= 0:
        raise AdapterHubFormatError(f"this adapter uses scaling={scaling!r}; deltatune imports a positive number")
    act = str(config.get("non_linearity", "relu")).lower()
    if act not in ACTIVATIONS:
        raise AdapterHubFormatError(
            f"this adapter uses non_linearity={act!r}; deltatune's bottleneck has {', '.join(ACTIVATIONS)}"
        )
    parallel, ln_before = bool(config.get("is_parallel")), bool(config.get("original_ln_before"))
    if not parallel and ln_before and config.get("residual_before_ln", True) is not True:
        raise AdapterHubFormatError(
            f"this adapter uses residual_before_ln={config['residual_before_ln']!r} with original_ln_before=True; "
            "deltatune imports residual_before_ln=True (seq_bn) only"
        )
    if parallel and config.get("mh_adapter"):
        raise AdapterHubFormatError("this parallel adapter also runs beside attention (mh_adapter); deltatune's "
                                    "parallel_adapter imports the FFN one only")  # fmt: skip
    blocks: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        match = _BN_KEY.match(key)
        if not match:
            raise AdapterHubFormatError(f"the adapter holds {key!r}, a bottleneck tensor deltatune does not know")
        blocks[place(model, match[1])][f"{match[2].split('.')[0].removeprefix('adapter_')}.{match[3]}"] = value
    for block, parts in blocks.items():
        missing = sorted({"down.weight", "down.bias", "up.weight", "up.bias"} - set(parts))
        if missing:
            raise AdapterHubFormatError(f"the adapter at {block} lacks {', '.join(missing)}: an edited file?")
    widths = {v["down.weight"].shape[0] for v in blocks.values()}
    if len(widths) != 1:
        raise AdapterHubFormatError(f"the adapter's bottlenecks have widths {sorted(widths)} (per-layer reduction "
                                    "factors?); deltatune imports one width")  # fmt: skip
    n, leave_out = n_layers(model), config.get("leave_out") or []
    for loc in ("mh_adapter", "output_adapter"):
        found = [layer_index(b) for b in blocks if _location(b) == loc]
        if found and not config.get(loc):
            raise AdapterHubFormatError(f"the adapter holds {loc} tensors while its config sets {loc}=False")
        if config.get(loc):
            check_layers(found, n, leave_out, loc)
    sub = "LayerNorm" if ln_before and not parallel else "dense"
    values = {}
    for block, parts in blocks.items():
        children = dict(model.get_submodule(block).named_children())
        if not {"dense", "LayerNorm"} <= set(children):
            raise AdapterHubFormatError(
                f"{block} is a {type(model.get_submodule(block)).__name__} without dense and LayerNorm: this import "
                "knows BERT-style blocks (BERT, RoBERTa, XLM-R, ELECTRA)"
            )
        values[f"{block}.{sub}"] = parts
    kw = {"targets": tuple(values), "layers": None, "bottleneck": widths.pop(), "non_linearity": ACTIVATIONS[act],
          "scaling": float(scaling)}  # fmt: skip
    if parallel:
        return ParallelAdapterConfig(**kw), values
    return (NormAdapterConfig if ln_before else AdapterConfig)(**kw), values


def _location(block: str) -> str:
    return "mh_adapter" if block.endswith("attention.output") else "output_adapter"


def _lora(
    model: nn.Module, config: dict, tensors: dict, ignore: tuple[str, ...]
) -> tuple[DeltaConfig, dict[str, dict[str, torch.Tensor]]]:
    mode = config.get("composition_mode", "add")
    if mode not in ("add", "scale"):
        raise AdapterHubFormatError(f"this adapter uses composition_mode={mode!r}; deltatune imports add and scale")
    what = "LoRA" if mode == "add" else "(IA)^3"
    check_fields(config, what, LORA_HONORED, LORA_REQUIRED, {}, ignore)
    factors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if not match:
            raise AdapterHubFormatError(f"the adapter holds {key!r}, a LoRA tensor deltatune does not know")
        factors[place(model, match[1])][match[2][-1]] = value
    if not factors:
        raise AdapterHubFormatError("the adapter holds no lora_A/lora_B tensors")
    leave_out = config.get("leave_out") or []
    check_layers({layer_index(m) for m in factors}, n_layers(model), leave_out, what)
    r, alpha = int(config.get("r", 8)), float(config.get("alpha", 8))
    if mode == "scale":
        if r != 1 or float(config.get("dropout", 0.0)):
            raise AdapterHubFormatError(f"an (IA)^3 adapter with r={r}, dropout={config.get('dropout')}: AdapterHub "
                                        "itself needs r=1 and no dropout")  # fmt: skip
        bad = sorted(m for m, f in factors.items() if set(f) != {"B"} or f["B"].shape[-1] != 1)
        if bad:
            raise AdapterHubFormatError(f"(IA)^3 tensors of {bad[0]!r} are not one lora_B vector of shape (n, 1)")
        # AdapterHub computes out * (l * alpha)
        values = {m: {"vector": f["B"].reshape(-1) * alpha} for m, f in factors.items()}
        return IA3Config(targets=tuple(factors), feedforward=(), layers=None), values
    bad = sorted(m for m, f in factors.items() if set(f) != {"A", "B"} or f["A"].shape[0] != r)
    if bad:
        raise AdapterHubFormatError(f"LoRA tensors of {bad[0]!r} are not lora_A (r={r}, in) and lora_B (out, r)")
    lora = LoRAConfig(targets=tuple(factors), layers=None, r=r, alpha=alpha, dropout=float(config.get("dropout", 0.0)))
    return lora, {m: {"A": f["A"], "B": f["B"]} for m, f in factors.items()}


@torch.no_grad()
def _copy(dm: DeltaModel, name: str, values: dict[str, dict[str, torch.Tensor]]) -> None:
    """Each saved tensor into the delta's parameter of the same shape (refused otherwise: another base model)."""
    delta = dm.delta(name)
    method = delta.config.method
    for module, parts in values.items():
        key = safe_key(module)
        for part, value in parts.items():
            if method == "lora":
                target = getattr(delta.layers[key], part)
            elif method == "ia3":
                target = delta.vectors[key]
            else:
                layer, attr = part.split(".")
                target = getattr(getattr(delta.adapters[key], layer), attr)
            if target.shape != value.shape:
                raise AdapterHubFormatError(
                    f"{module}: the adapter's {part} has shape {tuple(value.shape)}, this model needs "
                    f"{tuple(target.shape)}: another base model?"
                )
            target.copy_(value.to(target.dtype))
