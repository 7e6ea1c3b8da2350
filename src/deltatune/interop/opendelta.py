"""OpenDelta delta checkpoints in (`delta_model.save_finetuned(folder)`), with OpenDelta's outputs exactly.

OpenDelta 0.3.2 writes `config.json` (`delta_type`, the method's settings, `modified_modules`,
`backbone_class`, `backbone_hash`) and `pytorch_model.bin`: the backbone's state dict after
`freeze_module`, i.e. every parameter that still trains (the delta's, keyed under the module it sits on,
and `unfrozen_modules` such as the classifier), or the whole backbone when `freeze_module` never ran.
The pickle is read only with `torch.load(weights_only=True)`; a `model.safetensors` is preferred.
What each delta computes (read from `opendelta/delta_models/*.py`), with h the module's output:

* lora: W x + b + (alpha / r) B A dropout(x) -> `lora` on the modules the keys name;
* adapter: h + up(act(down(h))) -> `adapter` on those modules (no scaling);
* low_rank_adapter: the same with down/up = x (W_left * W_right) + b; OpenDelta multiplies the factors
  elementwise, a rank-one outer product only at `low_rank_rank=1` -> `lowrank_adapter` (rank 1);
* parallel_adapter: up(act(down(x))) from module A's input added to module B's output, (A, B) the
  pairs of `modified_modules`; saved under A only -> `parallel_adapter` (input_from A, target B) when
  both are linear layers of one block; `scaled` never reaches OpenDelta's layer (it computes x1);
* bitfit: the saved biases are the trained values b' -> `bitfit` with D = b' - b; a `bitfit.bias`
  offset after a leaf module is D itself (added to the module's own bias, or an added bias).

* soft_prompt: [soft_embeds; text] numbered from 0 -> `prompt` with positions="shift" (interop/opendelta_prompt.py).

Refused in one line: compacter and prefix (see `REFUSED`), other delta types,
activations deltatune's bottleneck lacks, module names the model lacks, a backbone of another
architecture, and saved backbone tensors whose values differ from the model's (modules OpenDelta
trained besides the delta, or another checkpoint). `backbone_hash` cannot be checked: OpenDelta
hashes `str()` of the model *with its delta modules inserted* plus every parameter (delta included),
which no other library reproduces; OpenDelta itself only warns on a mismatch.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict

import torch
from torch import nn

from ..core.delta import DeltaConfig, safe_key
from ..core.layers import is_linear
from ..core.model import DeltaModel
from ..core.targeting import TargetError, block_of, resolve
from ..methods.addition.adapter import AdapterConfig
from ..methods.addition.parallel_adapter import ParallelAdapterConfig
from ..methods.reparameterization.lora import LoRAConfig
from ..methods.reparameterization.lowrank_adapter import LowRankAdapterConfig
from ..methods.specification.bitfit import BitFitConfig
from .module_names import saved_name_candidates
from .opendelta_common import OpenDeltaFormatError, read_folder
from .opendelta_prompt import soft_prompt

# OpenDelta's activation names (lower-cased, as its Activations reads them) -> deltatune's bottleneck's
ACTIVATIONS = {
    "relu": "relu",
    "tanh": "tanh",
    "swish": "silu",
    "silu": "silu",
    "gelu": "gelu",
    "gelu_orig": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
REFUSED = {
    "compacter": "Compacter (OpenDelta's PHM layers, with its shared and factorized rules; OpenDelta 0.3.2 "
    "on transformers 4.57 saves no PHM tensors at all)",
    "prefix": "prefix tuning (OpenDelta hands per-layer past_key_value tuples to each attention module, "
    "an interface transformers replaced by Cache objects; on 4.57 its saved prefix covers layer 0 only)",
}
# OpenDelta's common-structure names -> deltatune's aliases (parallel adapter pairs)
COMMON = {"attn.q": "attn.q", "attn.k": "attn.k", "attn.v": "attn.v", "attn.proj": "attn.o", "ff.w1": "ffn.in",
          "ff.w2": "ffn.out"}  # fmt: skip
_KEYS = {
    "lora": re.compile(r"^(.+)\.lora\.(lora_A|lora_B)$"),
    "adapter": re.compile(r"^(.+)\.adapter\.modulelist\.(down_proj|up_proj)\.(weight|bias)$"),
    "low_rank_adapter": re.compile(r"^(.+)\.low_rank_adapter\.(down_sampler|up_sampler)\.(W_left|W_right|b)$"),
    "parallel_adapter": re.compile(r"^(.+)\.(parallel_adapter(?:_\d+)?)\.modulelist\.(down_proj|up_proj)\.(weight|bias)$"),
    "bitfit": re.compile(r"^(.+?)(\.bitfit)?\.bias$"),
    "soft_prompt": re.compile(r"^(.*?)\.?soft_prompt_layer\.(soft_embeds)$"),
}  # fmt: skip
Parts = dict[str, dict[str, torch.Tensor]]


def import_opendelta(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", head: bool = True
) -> DeltaModel:
    """Attach the OpenDelta delta saved in `folder` to `model` as a deltatune delta named `name`.

    `head`: also copy saved task-head tensors (OpenDelta saves `unfrozen_modules` such as the classifier)
    when they are this model's head, which then trains with the delta; another head is left out with a warning."""
    config, tensors = read_folder(folder)
    kind = check_type(config, folder)
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    _check_backbone(config, dm.backbone)
    parts, heads = _split(dm, kind, tensors)
    if not parts:
        raise OpenDeltaFormatError(f"{folder} holds no {kind} tensors (OpenDelta saved an empty delta)")
    delta_config, state = IMPORTERS[kind](dm.backbone, config, parts)
    try:
        dm.add(name, delta_config)
    except (TargetError, ValueError) as err:
        raise OpenDeltaFormatError(f"OpenDelta's {kind} does not map onto {type(dm.backbone).__name__}: {err}") from err
    try:
        _load(dm, name, state)
    except OpenDeltaFormatError:
        dm.detach(name)
        raise
    _import_head(dm, heads, head, folder)
    return dm


def check_type(config: dict, folder: str | os.PathLike) -> str:
    """The checkpoint's delta_type, when deltatune imports it (the CLI asks before loading a model)."""
    kind = config["delta_type"]
    if kind in REFUSED:
        raise OpenDeltaFormatError(f"{folder} holds OpenDelta {REFUSED[kind]}, which deltatune does not import; "
                                   f"importable: {', '.join(IMPORTERS)}")  # fmt: skip
    if kind not in IMPORTERS:
        raise OpenDeltaFormatError(f"OpenDelta delta_type {kind!r} has no deltatune mapping; importable: "
                                   f"{', '.join(IMPORTERS)}")  # fmt: skip
    return kind


def _check_backbone(config: dict, model: nn.Module) -> None:
    """The delta was saved from a model of this architecture (its class may differ: BertModel, ...ForX)."""
    import transformers

    saved = getattr(transformers, str(config.get("backbone_class")), None)
    theirs = getattr(getattr(saved, "config_class", None), "model_type", None)
    mine = getattr(getattr(model, "config", None), "model_type", None)
    if theirs and mine and theirs != mine:
        raise OpenDeltaFormatError(
            f"the delta was saved from a {config['backbone_class']} ({theirs}), this is {type(model).__name__} "
            f"({mine}): load it onto the backbone it was trained on"
        )


def _place(model: nn.Module, saved: str, names: set[str]) -> str | None:
    """The name in `model` of the module the saving model called `saved` (prefixes differ by head)."""
    return next((c for c in saved_name_candidates(model, saved) if c in names), None)


def _split(dm: DeltaModel, kind: str, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(module -> {part: tensor}) of the delta, and the saved head tensors; the rest must be the backbone's own."""
    model = dm.backbone
    names = {n for n, _ in model.named_modules()}
    params = dict(model.named_parameters())
    own_head = set(dm.head_parameter_names())
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    heads: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        placed = _place(model, owner, names)
        param = f"{placed}.{leaf}" if placed else None
        match = _KEYS[kind].match(key)
        if param in own_head or (match is None and key.startswith(tuple(f"{h}." for h in _head_roots(dm)))):
            heads[param or key] = value
            continue
        if match:
            module = _place(model, match[1], names)
            if module is None:
                raise OpenDeltaFormatError(
                    f"the delta has tensors for {match[1]!r}, which {type(model).__name__} lacks (fewer layers? "
                    "another architecture?): load it onto the backbone it was trained on"
                )
            parts[module][".".join(g or "" for g in match.groups()[1:]).strip(".") or "bias"] = value
            continue
        if param not in params:
            raise OpenDeltaFormatError(f"the checkpoint holds {key!r}, neither a {kind} tensor nor a parameter of "
                                       f"{type(model).__name__}: another backbone, or an edited file?")  # fmt: skip
        mine = params[param]
        if mine.shape != value.shape or not torch.equal(mine.detach().cpu(), value.to(mine.dtype)):
            raise OpenDeltaFormatError(
                f"the checkpoint holds {key!r} with values other than this model's: a backbone module OpenDelta "
                "trained besides the delta (unfrozen_modules), or another backbone; deltatune imports the delta "
                "and the task head only"
            )
    return dict(parts), heads


def _head_roots(dm: DeltaModel) -> set[str]:
    return {n.split(".")[0] for n in dm.head_parameter_names()} | {"classifier", "score", "lm_head", "qa_outputs"}


def _activation(config: dict) -> str:
    act = str(config.get("non_linearity", "gelu_new")).lower()
    if act not in ACTIVATIONS:
        raise OpenDeltaFormatError(f"this delta uses non_linearity={act!r}; deltatune's bottleneck has "
                                   f"{', '.join(ACTIVATIONS)} (OpenDelta's names)")  # fmt: skip
    return ACTIVATIONS[act]


def _need(parts: Parts, want: set[str], kind: str) -> None:
    for module, have in parts.items():
        if set(have) != want:
            raise OpenDeltaFormatError(
                f"the {kind} at {module} has {', '.join(sorted(have))}, not {', '.join(sorted(want))}: an edited file?"
            )


def _lora(model: nn.Module, config: dict, parts: Parts) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    _need(parts, {"lora_A", "lora_B"}, "LoRA")
    r = int(config.get("lora_r", 8))
    bad = sorted(m for m, p in parts.items() if p["lora_A"].shape[0] != r or p["lora_B"].shape[1] != r)
    if bad:
        raise OpenDeltaFormatError(f"the LoRA tensors of {bad[0]} are not of rank lora_r={r}: an edited file?")
    lora = LoRAConfig(targets=tuple(parts), layers=None, r=r, alpha=float(config.get("lora_alpha", 16)),
                      dropout=float(config.get("lora_dropout") or 0.0))  # fmt: skip
    state = {f"layers.{safe_key(m)}.{x}": p[f"lora_{x}"] for m, p in parts.items() for x in "AB"}
    return lora, state


def _bottleneck_state(module: str, p: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    ours = {"down_proj": "down", "up_proj": "up"}
    return {f"adapters.{safe_key(module)}.{ours[k.split('.')[-2]]}.{k.split('.')[-1]}": v for k, v in p.items()}


def _adapter(model: nn.Module, config: dict, parts: Parts) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    _need(parts, {f"{x}_proj.{y}" for x in ("down", "up") for y in ("weight", "bias")}, "adapter")
    widths = {p["down_proj.weight"].shape[0] for p in parts.values()}
    if len(widths) != 1:
        raise OpenDeltaFormatError(f"the adapters have bottleneck widths {sorted(widths)}; deltatune imports one")
    adapter = AdapterConfig(targets=tuple(parts), layers=None, bottleneck=widths.pop(),
                            non_linearity=_activation(config), scaling=1.0)  # fmt: skip
    return adapter, {k: v for m, p in parts.items() for k, v in _bottleneck_state(m, p).items()}


def _low_rank(model: nn.Module, config: dict, parts: Parts) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    _need(parts, {f"{x}_sampler.{y}" for x in ("down", "up") for y in ("W_left", "W_right", "b")}, "low-rank adapter")
    ranks = {p["down_sampler.W_left"].shape[1] for p in parts.values()}
    if ranks != {1}:
        raise OpenDeltaFormatError(
            f"this low-rank adapter has low_rank_rank={sorted(ranks)}; OpenDelta multiplies W_left * W_right "
            "elementwise, a rank-r product only at rank 1, which is what deltatune imports"
        )
    widths = {p["down_sampler.W_right"].shape[1] for p in parts.values()}
    if len(widths) != 1:
        raise OpenDeltaFormatError(
            f"the low-rank adapters have bottleneck widths {sorted(widths)}; deltatune imports one"
        )
    state = {}
    for module, p in parts.items():
        for theirs, ours in (("down_sampler", "down"), ("up_sampler", "up")):
            key = f"adapters.{safe_key(module)}.{ours}"
            state[f"{key}.T"] = p[f"{theirs}.W_left"].T.contiguous()  # x @ W_left @ W_right = x @ T.T @ S.T
            state[f"{key}.S"] = p[f"{theirs}.W_right"].T.contiguous()
            state[f"{key}.bias"] = p[f"{theirs}.b"]
    lowrank = LowRankAdapterConfig(targets=tuple(parts), layers=None, bottleneck=widths.pop(), rank=1,
                                   non_linearity=_activation(config))  # fmt: skip
    return lowrank, state


def _parallel(model: nn.Module, config: dict, parts: Parts) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    by_site: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for module, p in parts.items():
        for key, value in p.items():
            site, rest = key.split(".", 1)
            by_site[module][site][rest] = value
    modified = list(config.get("modified_modules") or [])
    pairs = list(zip(modified[0::2], modified[1::2], strict=False))
    sources, targets, state = [], [], {}
    for source, sites in by_site.items():
        target = source if len(sites) > 1 else _pair_target(model, source, pairs)
        for name in (source, target):
            if not is_linear(model.get_submodule(name)):
                raise OpenDeltaFormatError(
                    f"the parallel adapter reads {source}'s input and adds to {target}'s output; {name} is a "
                    f"{type(model.get_submodule(name)).__name__}, and deltatune's parallel_adapter pairs linear layers"
                )
        sources.append(source)
        targets.append(target)
        state.update(_bottleneck_state(target, next(iter(sites.values()))))
    widths = {v.shape[0] for k, v in state.items() if k.endswith("down.weight")}
    if len(widths) != 1:
        raise OpenDeltaFormatError(
            f"the parallel adapters have bottleneck widths {sorted(widths)}; deltatune imports one"
        )
    parallel = ParallelAdapterConfig(targets=tuple(targets), input_from=tuple(sources), layers=None,
                                     bottleneck=widths.pop(), non_linearity=_activation(config), scaling=1.0)  # fmt: skip
    return parallel, state


def _pair_target(model: nn.Module, source: str, pairs: list[tuple[str, str]]) -> str:
    """B of the pair (A, B) whose A is `source`: the module of source's block that B names."""
    block = block_of(source)
    for first, second in pairs:
        found = first != second and source in _named(model, first)
        ends = [n for n in _named(model, second) if block is not None and block_of(n) == block]
        if found and len(ends) == 1:
            return ends[0]
    if any(first == second for first, second in pairs):  # (A, A): beside the module itself, saved once
        return source
    raise OpenDeltaFormatError(
        f"the parallel adapter reads {source!r}, but no pair of modified_modules {[list(p) for p in pairs]} names "
        "one module of its block to add to"
    )


def _named(model: nn.Module, name: str) -> list[str]:
    """Modules an OpenDelta modified_modules entry names: a common-structure name, or a name suffix."""
    if name.startswith("[r]"):
        raise OpenDeltaFormatError(f"modified_modules entry {name!r} is a regular expression; deltatune maps names")
    plain = name.replace("@", "")
    target = COMMON.get(plain, plain) if "@" in name else plain
    try:
        return resolve(model, (target,))
    except TargetError:
        return []


def _bitfit(model: nn.Module, config: dict, parts: Parts) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    state, added = {}, False
    for module, p in parts.items():
        mod = model.get_submodule(module)
        bias = getattr(mod, "bias", None)
        offset = p.get("bitfit", torch.zeros(()))
        if isinstance(bias, torch.Tensor):  # D = b' - b, plus a bitfit.bias offset after the module
            trained = p.get("bias", bias.detach())
            state[f"delta.{safe_key(module + '.bias')}"] = (trained.to(bias.dtype) - bias.detach().cpu()) + offset
        elif is_linear(mod) and "bitfit" in p:
            state[f"added.{safe_key(module + '.bias')}"] = offset
            added = True
        else:
            raise OpenDeltaFormatError(
                f"the BitFit delta adds a bias after {module} ({type(mod).__name__}); deltatune's bitfit adds "
                "biases to linear layers only"
            )
    bitfit = BitFitConfig(targets=tuple(parts), layers=None, exclude_head=False, add_bias=True if added else None)
    return bitfit, state


@torch.no_grad()
def _load(dm: DeltaModel, name: str, state: dict[str, torch.Tensor]) -> None:
    delta = dm.delta(name)
    mine = delta.state_dict()
    for key, value in state.items():
        if key not in mine:
            raise OpenDeltaFormatError(f"deltatune's {delta.config.method} has no tensor {key!r}: an edited file?")
        if mine[key].shape != value.shape:
            raise OpenDeltaFormatError(
                f"{key}: the checkpoint's tensor has shape {tuple(value.shape)}, this model needs "
                f"{tuple(mine[key].shape)}: another base model?"
            )
    missing = sorted(set(mine) - set(state))
    if missing:
        raise OpenDeltaFormatError(f"the checkpoint has no value for {missing[0]}: an edited file?")
    delta.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})


def _import_head(dm: DeltaModel, heads: dict[str, torch.Tensor], head: bool, folder: str | os.PathLike) -> None:
    if not heads:
        return
    params = dict(dm.backbone.named_parameters())
    own = set(dm.head_parameter_names())
    fits = all(k in own and params[k].shape == v.shape for k, v in heads.items())
    if not head or not fits:
        why = "head=False" if not head else f"its tensors ({', '.join(sorted(heads)[:3])}) are not this model's head"
        warnings.warn(f"the task head saved in {folder} is not imported: {why}", UserWarning, stacklevel=3)
        return
    with torch.no_grad():
        for k, v in heads.items():
            params[k].copy_(v.to(params[k].dtype))
    dm.freeze(train_head=True)  # OpenDelta trained it with the delta (unfrozen_modules); keep training it


IMPORTERS = {
    "lora": _lora,
    "adapter": _adapter,
    "low_rank_adapter": _low_rank,
    "parallel_adapter": _parallel,
    "bitfit": _bitfit,
    "soft_prompt": soft_prompt,
}
