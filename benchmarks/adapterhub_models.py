"""The model pairs `benchmarks.adapterhub` compares: AdapterHub's `adapters` and deltatune, same config, same weights.

Each method is one of AdapterHub's presets at its defaults beside the deltatune delta that computes
the same function (docs/ecosystem.md): `seq_bn` = `norm_adapter` on each block's FFN LayerNorm,
`double_seq_bn` = `adapter` (Houlsby placement, silu as AdapterHub's "swish"), `par_bn` =
`parallel_adapter`, `lora` = `lora`, `ia3` = `ia3` on attn.k/attn.v/ffn.in with `feedforward=()`.

A pair is built as a user of each library builds it: deltatune's delta attached natively
(`DeltaModel.add`, the head training), its tensors and the head perturbed away from their
initialisation, written with `export_adapterhub` and loaded by AdapterHub's own `load_adapter` into
a second copy of the backbone (`adapters.init`, `train_adapter`: AdapterHub freezes the encoder, the
static head trains). Both copies share the frozen backbone tensors. The check that the two run the
same config: the config AdapterHub loaded equals its preset's (`adapters_config.get(name)`), and the
trainable parameter counts are equal.

Exactness, both directions: deltatune -> AdapterHub (the pair above) and AdapterHub -> deltatune
(`save_adapter` of AdapterHub's model, `import_adapterhub` into a third copy): max |logit
difference| in eval mode. Merged: each library merges a private copy of the backbone (merging writes
the weights) and is compared with the other's merged and with its own unmerged model.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.interop import export_adapterhub, import_adapterhub

from .models import share_frozen

METHODS = ("lora", "seq_bn", "double_seq_bn", "par_bn", "ia3")
MERGEABLE = ("lora", "ia3")  # AdapterHub's merge_adapter covers its LoRA-family modules only


def available() -> bool:
    if "adapters" in sys.modules:  # imported: its lazy module has no __spec__, which find_spec refuses
        return True
    return importlib.util.find_spec("adapters") is not None


def ah_preset(method: str) -> Any:
    """AdapterHub's preset config, at its defaults (LoRA: r 8, alpha 8 on q and v)."""
    import adapters

    return {
        "lora": lambda: adapters.LoRAConfig(r=8, alpha=8, attn_matrices=["q", "v"]),
        "seq_bn": lambda: adapters.SeqBnConfig(reduction_factor=16),
        "double_seq_bn": lambda: adapters.DoubleSeqBnConfig(reduction_factor=16),
        "par_bn": lambda: adapters.ParBnConfig(reduction_factor=2),
        "ia3": lambda: adapters.IA3Config(),
    }[method]()


def dt_config(method: str, hidden: int) -> dt.DeltaConfig:
    """The deltatune config computing what `ah_preset(method)` computes on a BERT-style encoder."""
    if method == "lora":
        return dt.get_config("lora", targets=("attn.q", "attn.v"), r=8, alpha=8.0)
    if method == "seq_bn":
        return dt.get_config("norm_adapter", targets=(r"re:.*layer\.\d+\.output\.LayerNorm",), bottleneck=hidden // 16)
    if method == "double_seq_bn":
        return dt.get_config("adapter", placement="houlsby", bottleneck=hidden // 16, non_linearity="silu")
    if method == "par_bn":
        return dt.get_config("parallel_adapter", bottleneck=hidden // 2, scaling=4.0)
    if method == "ia3":
        return dt.get_config("ia3", targets=("attn.k", "attn.v", "ffn.in"), feedforward=())
    raise KeyError(f"unknown AdapterHub method {method!r}; known: {', '.join(METHODS)}")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def perturb(model: nn.Module, seed: int, scale: float = 0.01) -> None:
    """Move every trainable tensor (delta and head) off its initialisation: no path may be skipped."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model):
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


def attach_dt(model: nn.Module, method: str) -> dt.DeltaModel:
    torch.manual_seed(0)
    return dt.DeltaModel(model).add(method, dt_config(method, model.config.hidden_size), train_head=True)


def attach_ah(model: nn.Module, method: str, folder: str | Path | None = None) -> nn.Module:
    """AdapterHub on `model` (in place): the preset added, or a saved folder loaded; set to train it."""
    import adapters

    adapters.init(model)
    log = logging.getLogger("adapters.model_mixin")  # set_active/train_adapter's forward contexts warn "none activated"
    level, _ = log.level, log.setLevel(logging.ERROR)
    try:
        if folder is None:
            torch.manual_seed(0)
            model.add_adapter(method, config=ah_preset(method))
        else:
            loaded = model.load_adapter(str(folder), use_safetensors=True)
            assert loaded == method, (loaded, method)
        model.set_active_adapters(method)
        model.train_adapter(method)
    finally:
        log.setLevel(level)
    return model


def logits(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.inference_mode():
        out = model(**data).logits
    model.train(was)
    return out


def max_diff(a: nn.Module, b: nn.Module, data: dict[str, torch.Tensor]) -> float:
    return (logits(a, data) - logits(b, data)).abs().max().item()


@dataclasses.dataclass
class Pair:
    method: str
    ah: nn.Module
    dt: dt.DeltaModel
    info: dict[str, Any]


def pair(base: nn.Module, method: str, data: dict[str, torch.Tensor], seed: int = 0) -> Pair:
    """deltatune's delta and AdapterHub's preset on copies of `base` sharing its frozen tensors, same weights."""
    ours = attach_dt(share_frozen(base), method)
    perturb(ours, seed)
    with tempfile.TemporaryDirectory() as tmp:
        export_adapterhub(ours, Path(tmp) / "from-dt", method)
        theirs = attach_ah(share_frozen(base), method, Path(tmp) / "from-dt")
        loaded = dict(theirs.adapters_config.get(method))
        preset = ah_preset(method).to_dict()
        theirs.save_adapter(str(Path(tmp) / "from-ah"), method, use_safetensors=True)
        back = import_adapterhub(share_frozen(base), Path(tmp) / "from-ah")
    n_ah, n_dt = (sum(p.numel() for p in trainable(m)) for m in (theirs, ours))
    info = {
        "adapterhub_config": loaded,
        "config_is_the_preset": loaded == preset,
        "deltatune_config": repr(ours.deltas[method].config),
        "trainable_adapterhub": n_ah,
        "trainable_deltatune": n_dt,
        "max_logit_diff_dt_to_ah": max_diff(ours, theirs, data),
        "max_logit_diff_ah_to_dt": max_diff(theirs, back, data),
        "max_logit_diff_delta_off": _delta_off(ours, method, data),
        "max_logit_diff_block_dropout_halved": _train_mode_placement(ours, theirs, data),
    }
    if loaded != preset:
        info["config_difference"] = {k: (loaded.get(k), preset.get(k)) for k in preset if loaded.get(k) != preset[k]}
    del back
    theirs.train()
    ours.train()
    return Pair(method, theirs, ours, info)


def _delta_off(dm: dt.DeltaModel, method: str, data: dict[str, torch.Tensor]) -> float:
    """How far the delta moves the logits: the scale the exactness numbers are read against."""
    on = logits(dm, data)
    dm.disable(method)
    off = logits(dm, data)
    dm.enable(method)
    return (on - off).abs().max().item()


class _Half(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def _train_mode_placement(ours: nn.Module, theirs: nn.Module, data: dict[str, torch.Tensor]) -> float:
    """Logits apart with each block's hidden dropout replaced by a deterministic x * 0.5 in both models.

    Eval mode makes dropout the identity, so eval outputs cannot tell whether an adapter's output passes
    through the block's dropout (deltatune's hooked `adapter`/`parallel_adapter`) or is added after it
    (AdapterHub's bottlenecks): this does, without comparing random masks.
    """
    swapped = []
    for model in (ours, theirs):
        for name, module in model.named_modules():
            if name.endswith("output") and isinstance(getattr(module, "dropout", None), nn.Dropout):
                swapped.append((module, module.dropout))
                module.dropout = _Half()
    try:
        return max_diff(ours, theirs, data)
    finally:
        for module, dropout in swapped:
            module.dropout = dropout


def merged(base: nn.Module, p: Pair, data: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """Each library's merged model (a private backbone copy each, since merging writes the weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        p.ah.save_adapter(tmp, p.method, use_safetensors=True)
        theirs = attach_ah(copy.deepcopy(base), p.method, tmp).eval()
    theirs.merge_adapter(p.method)
    ours = copy.deepcopy(base)
    dm = attach_dt(ours, p.method)
    dm.load_state_dict(p.dt.state_dict(), strict=False)
    dm.eval().merge(p.method)
    info = {
        "max_logit_diff_merged_dt_vs_ah": max_diff(dm, theirs, data),
        "max_logit_diff_dt_merged_vs_unmerged": max_diff(dm, p.dt, data),
        "max_logit_diff_ah_merged_vs_unmerged": max_diff(theirs, p.ah, data),
    }
    return theirs, dm, info
