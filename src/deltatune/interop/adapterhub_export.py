"""deltatune deltas out as AdapterHub (`adapters` library) folders that give deltatune's outputs exactly.

The mirror of `import_adapterhub` (its module docstring has the math), for BERT and RoBERTa:

* `norm_adapter` on blocks' `output.LayerNorm` (and `attention.output.LayerNorm`) -> `seq_bn`
  (original_ln_before=True; mh_adapter for the attention one);
* `adapter` on `output.dense` (and `attention.output.dense`) -> a sequential bottleneck with
  original_ln_before=False (`double_seq_bn` when both);
* `parallel_adapter` on `output.dense` reading `intermediate.dense`'s input -> `par_bn`;
* `lora` on query/key/value, `intermediate.dense`, `output.dense` -> `lora`;
* `ia3` scaling those modules' outputs -> `ia3` (alpha 1, lora_B the vector).

AdapterHub puts an adapter at each location its config names in every layer but `leave_out`: the
delta's sites must form such a set, with one bottleneck width (`reduction_factor` = hidden / width) or
one (r, alpha). Anything else is refused in one line. The folder holds `adapter_config.json` as
`save_adapter` writes it (keys sorted, indent 2), `adapter.safetensors` (never a pickle) and, for a
model with a task head, `head_config.json` + `model_head.safetensors` as a static-head model saves them.
adapters 1.3.0 reads safetensors only when asked: `model.load_adapter(folder, use_safetensors=True)`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import replacing_folder
from ..core.delta import Delta, safe_key
from ..core.model import DeltaModel
from .adapterhub import ACTIVATIONS, BN_REQUIRED, LORA_REQUIRED
from .adapterhub_common import CONFIG, HEAD_CONFIG, HEAD_WEIGHTS, WEIGHTS, AdapterHubFormatError, n_layers

# the `adapters` release whose format is written and whose loader the export was checked against; a
# version below 1.1.0 would have AdapterHub overwrite a LoRA's alpha with r (its backward-compat fix)
FORMAT_VERSION = "adapters.1.3.0"
MODEL_TYPES = ("bert", "roberta")
EXPORTABLE = "norm_adapter (seq_bn), adapter (double_seq_bn), parallel_adapter (par_bn), lora, ia3"
# deltatune's activation -> AdapterHub's name (the first the import maps to it: silu -> "swish", gelu_tanh -> "gelu_new")
NON_LINEARITIES = {ours: theirs for theirs, ours in reversed(ACTIVATIONS.items())}
# BnConfig.to_dict() of adapters 1.3.0 for the fields the export does not set (PHM, invertible adapters: off)
BN_CONFIG = {k: v for k, (v, _) in BN_REQUIRED.items()} | {
    "adapter_residual_before_ln": False, "dropout": 0.0, "factorized_phm_W": True, "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform", "init_weights_seed": None, "inv_adapter_reduction_factor": None,
    "learn_phm": True, "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4,
    "phm_init_range": 0.0001, "phm_rank": 1, "residual_before_ln": True, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0,
}  # fmt: skip
LORA_CONFIG = {k: v for k, (v, _) in LORA_REQUIRED.items()} | {"architecture": "lora", "init_weights_seed": None}
# where AdapterHub's bottleneck sits: the block (BertSelfOutput / BertOutput) -> its location flag
BN_LOCATIONS = {"attention.output": "mh_adapter", "output": "output_adapter"}
# the modules AdapterHub's LoRA / (IA)^3 wraps -> (location flag, attn_matrices entry)
LORA_LOCATIONS = {
    "attention.self.query": ("selfattn_lora", "q"),
    "attention.self.key": ("selfattn_lora", "k"),
    "attention.self.value": ("selfattn_lora", "v"),
    "intermediate.dense": ("intermediate_lora", None),
    "output.dense": ("output_lora", None),
}


def export_adapterhub(
    dm: DeltaModel, folder: str | os.PathLike, name: str = "default", include_head: bool = True
) -> Path:
    """Write the delta `name` as an AdapterHub adapter folder named `name` (`model.save_adapter`'s layout).

    Load it with `adapters.init(model); model.load_adapter(folder, use_safetensors=True)` on the same base
    weights. `include_head`: also write the model's task head (classifier), which AdapterHub loads into a
    static-head model of the same class (`BertForSequenceClassification`, ...)."""
    delta = dm.delta(name)
    method = delta.config.method
    if method not in _EXPORTERS:
        raise AdapterHubFormatError(f"{method} has no AdapterHub equivalent; exportable: {EXPORTABLE}")
    backbone = dm.backbone
    blocks = _blocks_prefix(backbone, method)
    config, tensors = _EXPORTERS[method](delta, name, blocks, backbone)
    meta = _meta(backbone, name, config)
    head = _head(dm) if include_head else None
    return _write(Path(folder), meta, tensors, head)


def _blocks_prefix(model: nn.Module, method: str) -> str:
    """`bert.encoder.layer.` (a model with a head) or `encoder.layer.` (a bare encoder): where the blocks are."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise AdapterHubFormatError(
            f"export_adapterhub writes {'/'.join(MODEL_TYPES)} adapters (checked against adapters 1.3.0); this "
            f"{method} delta is on a {model_type} model: use export_peft or save_delta for it"
        )
    prefix = getattr(model, "base_model_prefix", "") or ""
    return f"{prefix}.encoder.layer." if prefix and hasattr(model, prefix) else "encoder.layer."


def _sites(delta: Delta, blocks: str, places: Any, what: str) -> dict[str, list[tuple[int, str]]]:
    """location -> [(layer, site)] for every site of the delta; a site AdapterHub has no place for is refused."""
    found: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for site in delta.sites:
        layer, _, rest = site.removeprefix(blocks).partition(".")
        if not site.startswith(blocks) or not layer.isdigit() or rest not in places:
            raise AdapterHubFormatError(
                f"the {delta.config.method} delta sits on {site!r}, where AdapterHub has no {what}; it has one on "
                f"{blocks}<i>.{{{', '.join(places)}}}: attach it there to export it"
            )
        found[places[rest]].append((int(layer), site))
    return found


def _leave_out(found: dict[str, list[tuple[int, str]]], model: nn.Module, what: str) -> list[int]:
    """AdapterHub's `leave_out`: one set of layers for every location the config names."""
    layers = {loc: sorted(i for i, _ in sites) for loc, sites in found.items()}
    if len({tuple(v) for v in layers.values()}) > 1:
        shown = "; ".join(f"{loc} on layers {v}" for loc, v in sorted(layers.items()))
        raise AdapterHubFormatError(
            f"the delta has {shown}, but AdapterHub's {what} takes one leave_out for every location: attach it to "
            "the same layers at each place"
        )
    covered = set(next(iter(layers.values())))
    return sorted(set(range(n_layers(model))) - covered)


def _reduction_factor(hidden: int, width: int) -> int | float:
    """A factor f with int(hidden // f) == width, AdapterHub's bottleneck width (an int where it divides)."""
    if hidden % width == 0:
        return hidden // width
    factor = hidden / width
    for _ in range(64):  # hidden // f is floored: step f down a few ulps until it gives the width
        if int(hidden // factor) == width:
            return factor
        factor = math.nextafter(factor, -math.inf if int(hidden // factor) < width else math.inf)
    raise AdapterHubFormatError(f"no reduction_factor gives a bottleneck of {width} on a hidden size of {hidden}")


def _bottleneck(delta: Delta, name: str, blocks: str, model: nn.Module) -> tuple[dict, dict]:
    cfg, method = delta.config, delta.config.method
    sub = "LayerNorm" if method == "norm_adapter" else "dense"
    places = {f"{b}.{sub}": loc for b, loc in BN_LOCATIONS.items()}
    if method == "parallel_adapter":
        places = {"output.dense": "output_adapter"}
    what = {"norm_adapter": "seq_bn", "adapter": "sequential bottleneck", "parallel_adapter": "par_bn"}[method]
    found = _sites(delta, blocks, places, what)
    for layer, site in found["output_adapter"] if method == "parallel_adapter" else []:
        source, want = delta.sources[site], f"{blocks}{layer}.intermediate.dense"
        if source != want:
            raise AdapterHubFormatError(
                f"the parallel adapter on {site!r} reads {source!r}'s input; AdapterHub's par_bn reads the FFN's "
                f"input ({want}): attach it with input_from=('ffn.in',) to export it"
            )
    if cfg.non_linearity not in NON_LINEARITIES:
        raise AdapterHubFormatError(
            f"this {method} uses non_linearity={cfg.non_linearity!r}; the export writes "
            f"{', '.join(NON_LINEARITIES)} (AdapterHub's {', '.join(NON_LINEARITIES.values())})"
        )
    hidden = int(model.config.hidden_size)
    config = BN_CONFIG | {
        "init_weights": "mam_adapter" if method == "parallel_adapter" else "bert",
        "is_parallel": method == "parallel_adapter",
        "leave_out": _leave_out(found, model, "bottleneck adapter"),
        "mh_adapter": "mh_adapter" in found,
        "non_linearity": NON_LINEARITIES[cfg.non_linearity],
        "original_ln_before": method == "norm_adapter",
        "output_adapter": "output_adapter" in found,
        "reduction_factor": _reduction_factor(hidden, int(cfg.bottleneck)),
        "scaling": float(cfg.scaling),
    }
    tensors = {}
    for _, site in (s for sites in found.values() for s in sites):
        block, prefix = delta.adapters[safe_key(site)], f"{site.rsplit('.', 1)[0]}.adapters.{name}."
        for theirs, ours, shape in (("adapter_down.0", block.down, (cfg.bottleneck, hidden)),
                                    ("adapter_up", block.up, (hidden, cfg.bottleneck))):  # fmt: skip
            if not isinstance(ours, nn.Linear) or tuple(ours.weight.shape) != shape or ours.bias is None:
                raise AdapterHubFormatError(f"the {method} at {site!r} is not a {hidden}-wide linear bottleneck")
            tensors[f"{prefix}{theirs}.weight"], tensors[f"{prefix}{theirs}.bias"] = ours.weight, ours.bias
    return config, tensors


def _lora(delta: Delta, name: str, blocks: str, model: nn.Module) -> tuple[dict, dict]:
    ia3, places = delta.config.method == "ia3", {}
    for module, (loc, matrix) in LORA_LOCATIONS.items():
        places[module] = f"{matrix} ({loc})" if matrix else loc  # each attention matrix is a location of its own
    found = _sites(delta, blocks, places, "(IA)^3" if ia3 else "LoRA")
    matrices = [m for m in "qkv" if f"{m} (selfattn_lora)" in found]
    config = LORA_CONFIG | {
        "attn_matrices": matrices or (["k", "v"] if ia3 else ["q", "v"]),
        "composition_mode": "scale" if ia3 else "add",
        "intermediate_lora": "intermediate_lora" in found,
        "leave_out": _leave_out(found, model, "(IA)^3" if ia3 else "LoRA"),
        "output_lora": "output_lora" in found,
        "selfattn_lora": bool(matrices),
    }
    sites = [site for sites in found.values() for _, site in sites]
    if ia3:
        inputs = [s for s in sites if delta._scales_input[safe_key(s)]]
        if inputs:
            raise AdapterHubFormatError(
                f"the (IA)^3 delta scales the input of {inputs[0]!r} (feedforward); AdapterHub's (IA)^3 scales "
                "outputs only: attach it with feedforward=() (AdapterHub's ia3: targets=('attn.k', 'attn.v', "
                "'ffn.in'), feedforward=())"
            )
        config |= {"alpha": 1, "dropout": 0.0, "init_weights": "ia3", "r": 1}  # out * (alpha * l), l the vector
        return config, {f"{s}.loras.{name}.lora_B": delta.vectors[safe_key(s)].reshape(-1, 1) for s in sites}
    pairs = {s: delta.config.rank_alpha(s) for s in sites}
    if len(set(pairs.values())) > 1:
        shown = ", ".join(f"{s}: r={r}, alpha={a:g}" for s, (r, a) in list(pairs.items())[:3])
        raise AdapterHubFormatError(
            f"the LoRA delta has several (r, alpha) ({shown}, ...); AdapterHub's LoRA has one r and one alpha: "
            "attach it without rank_pattern/alpha_pattern to export it"
        )
    r, alpha = next(iter(pairs.values()))
    config |= {"alpha": int(alpha) if float(alpha).is_integer() else alpha, "dropout": float(delta.config.dropout),
               "init_weights": "lora", "r": int(r)}  # fmt: skip
    tensors = {}
    for s in sites:
        layer = delta.layers[safe_key(s)]
        tensors[f"{s}.loras.{name}.lora_A"], tensors[f"{s}.loras.{name}.lora_B"] = layer.A, layer.B
    return config, tensors


_EXPORTERS = {m: _bottleneck for m in ("norm_adapter", "adapter", "parallel_adapter")} | {"lora": _lora, "ia3": _lora}


def _meta(model: nn.Module, name: str | None, config: dict | None) -> dict:
    """What AdapterHub's build_full_config writes beside a config."""
    return {
        "config": config,
        "hidden_size": getattr(model.config, "hidden_size", None),
        "model_class": type(model).__name__,
        "model_name": model.config.name_or_path,
        "model_type": model.config.model_type,
        "name": name,
        "version": FORMAT_VERSION,
    }


def _head(dm: DeltaModel) -> tuple[dict, dict] | None:
    """(head_config.json, tensors) as a static-head model's save_adapter writes them: every state-dict entry
    outside the base model; None for a bare encoder (AdapterHub writes no head for one either)."""
    model = dm.backbone
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not hasattr(model, prefix):
        return None
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    own = set(dm.head_parameter_names())
    stray = sorted(set(tensors) - own)
    if stray:
        raise AdapterHubFormatError(
            f"AdapterHub would save {stray[0]!r} with the head, which is not a task-head parameter of this model "
            "(a tied or shared weight?): pass include_head=False to write the adapter alone"
        )
    if not tensors:
        return None
    meta = _meta(model, None, None) | {"label2id": dict(model.config.label2id), "num_labels": model.config.num_labels}
    return meta, tensors


def _write(folder: Path, meta: dict, tensors: dict, head: tuple[dict, dict] | None) -> Path:
    """Every file into a temporary folder, then renamed into place: never half an adapter."""
    from safetensors.torch import save_file

    ours = {CONFIG, HEAD_CONFIG, *WEIGHTS, *HEAD_WEIGHTS}
    if folder.exists() and (not folder.is_dir() or any(p.name not in ours for p in folder.iterdir())):
        raise FileExistsError(f"{folder} exists and holds other files; choose a new folder")

    def plain(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in t.items()}

    with replacing_folder(folder) as tmp:  # an old folder's pickles go with it: load_adapter could read them
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
        save_file(plain(tensors), str(tmp / WEIGHTS[0]))
        if head is not None:
            (tmp / HEAD_CONFIG).write_text(json.dumps(head[0], indent=2, sort_keys=True))
            save_file(plain(head[1]), str(tmp / HEAD_WEIGHTS[0]))
    return folder
