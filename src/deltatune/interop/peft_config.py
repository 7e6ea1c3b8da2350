"""PEFT's config objects given to `attach`/`add`: `dt.attach(model, LoraConfig(r=8, target_modules=[...]))`.

A PEFT script moves to deltatune by changing the line that builds the model, and keeps its config. The config is
read as PEFT would apply it to this model, or refused by field: LoRA (rsLoRA, DoRA, rank and alpha patterns, PEFT's
per-model default targets, "all-linear", exclude_modules, layers_to_transform) and (IA)^3 (feedforward modules).
Every field that differs from PEFT's default and is not read here is refused by name, so a later PEFT's new field
cannot be dropped unseen. PEFT's other methods are refused naming deltatune's config of the same method.
The registered reader (`core.registry.CONFIG_READERS`) recognises PEFT's classes by their module; peft is imported
only where such an object was given, so it is installed.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..core.delta import DeltaConfig
from ..core.registry import CONFIG_READERS
from ..core.targeting import (
    ALL_LINEAR,
    TargetError,
    head_names,
    head_trains_by_default,
    in_head,
    layer_index,
    model_type,
    resolve,
)
from ..methods.addition.ia3 import IA3Config
from ..methods.reparameterization.lora import LoRAConfig, pattern_value
from .peft_lora import lora_config, peft_alpha

# fields that say what the adapter is for, not what it computes (task_type: deltatune's train_head="auto" trains
# the heads PEFT's task types train); fan_in_fan_out: the layout is read from the layer, as PEFT corrects it
_IGNORED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "fan_in_fan_out", "megatron_core", "qalora_group_size"}  # fmt: skip
_TARGETING = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"}
_READ = {
    "LORA": _TARGETING | {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"},
    "IA3": _TARGETING | {"feedforward_modules"},
}
_OTHERS = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix", "LOHA": "loha", "LOKR": "lokr", "VERA": "vera",
           "OFT": "oft", "ADALORA": "adalora", "LN_TUNING": "layernorm"}  # fmt: skip


def read_peft_config(config: Any, model: nn.Module) -> DeltaConfig | None:
    """The deltatune config that computes what PEFT's `config` would on `model`; None for objects not PEFT's."""
    if type(config).__module__.split(".")[0] != "peft" or not hasattr(config, "peft_type"):
        return None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    name = type(config).__name__
    if kind not in _READ:
        ours = _OTHERS.get(kind)
        use = f"dt.get_config({ours!r}, ...) (deltatune's {ours})" if ours else "deltatune's own config"
        raise ValueError(f"attach reads PEFT's LoraConfig and IA3Config; for {name}, write {use}")
    fields = config.to_dict()
    defaults = type(config)().to_dict()
    for key, value in fields.items():
        if key not in _READ[kind] and key not in _IGNORED and value != defaults.get(key):
            raise ValueError(
                f"{name}.{key}={value!r} has no deltatune equivalent in attach; leave it at PEFT's default "
                f"({defaults.get(key)!r}) or use a deltatune config"
            )
    if fields.get("layers_pattern"):
        raise ValueError(f"{name}.layers_pattern is not read; select the blocks with target_modules as a regex")
    _check_saved_modules(name, fields.get("modules_to_save"), model)
    mapping = (
        "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
        if kind == "LORA"
        else "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"
    )
    targets = _targets(name, "target_modules", fields.get("target_modules"), model, mapping)
    modules = resolve(model, targets, None)
    layers = _layers(name, fields.get("layers_to_transform"), modules)
    excluded = fields.get("exclude_modules")
    if excluded or layers is not None:  # the modules PEFT would pick, named one by one
        drop = set(resolve(model, _as_targets(excluded), None)) if excluded else set()
        modules = [m for m in modules if m not in drop and (layers is None or layer_index(m) in layers)]
        if not modules:
            raise ValueError(
                f"{name} selects no module of {type(model).__name__} (exclude_modules, layers_to_transform)"
            )
        targets = tuple(modules)  # full names: each matches itself only
    if kind == "IA3":
        return _ia3(name, fields, model, targets, modules)
    return _lora(fields, targets, modules)


def _lora(c: dict, targets: Any, modules: list[str]) -> LoRAConfig:
    r = int(c["r"])
    per_module = {}
    for module in modules:  # PEFT's pattern rule per module, kept as exact per-module patterns
        r_m = int(pattern_value(c.get("rank_pattern"), module, r))
        per_module[module] = (r_m, peft_alpha(c, r_m, module))
    return lora_config(c, targets, r, peft_alpha(c, r), per_module)


def _ia3(name: str, c: dict, model: nn.Module, targets: Any, modules: list[str]) -> IA3Config:
    """PEFT rescales the input of its feedforward modules (the default list of the model type where none is
    given, as PEFT), the output of the others; deltatune's `feedforward` is the same side."""
    mapping = "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"
    try:
        feedforward = set(
            resolve(model, _targets(name, "feedforward_modules", c.get("feedforward_modules"), model, mapping))
        )
    except TargetError:  # names no module of this model: PEFT rescales every output then
        feedforward = set()
    return IA3Config(targets=targets, feedforward=tuple(m for m in modules if m in feedforward))


def _as_targets(value: Any) -> Any:
    """PEFT's targeting rule in deltatune's terms: a list names modules or suffixes at a dot (as ours does), a string
    is a regex over the whole name (ours: 're:'), "all-linear" is ours too."""
    if isinstance(value, str):
        return ALL_LINEAR if value.lower() == ALL_LINEAR else f"re:{value}"
    return tuple(sorted(value))


def _targets(name: str, field: str, value: Any, model: nn.Module, mapping: str) -> Any:
    if value is None:  # PEFT's default for this model type, from PEFT itself
        from peft.utils import constants

        value = getattr(constants, mapping, {}).get(model_type(model))
        if value is None:
            raise ValueError(
                f"{name}.{field} is not set and PEFT has no default for model type {model_type(model)!r}; "
                + (
                    f"name the modules, e.g. {field}={_example(model)} or 'all-linear'"
                    if field == "target_modules"
                    else "name the modules"
                )
            )
    if isinstance(value, str) and value.lower() == ALL_LINEAR:
        _check_fused_experts(name, field, model)
    return _as_targets(value)


def _check_fused_experts(name: str, field: str, model: nn.Module) -> None:
    """PEFT's "all-linear" on a mixture-of-experts model whose experts are fused 3-D weights (transformers 5's
    Qwen3-MoE, Mixtral, ...) also adapts the experts and their router, which are no linear layers: deltatune's
    "all-linear" took the attention alone, without a word, so the delta trained less than PEFT's."""
    fused = next((n for n, m in model.named_modules() if any(p.dim() == 3 for p in m.parameters(recurse=False))), None)
    if fused is not None:
        raise ValueError(
            f"{name}.{field}='all-linear' on this mixture-of-experts model: PEFT also adapts the experts' fused 3-D "
            f"weights ({fused}) and their routers, which deltatune cannot; name the linear layers to adapt, e.g. "
            f"{field}={_example(model)}, or use deltatune's config (targets='all-linear': the linear layers alone)"
        )


def _example(model: nn.Module) -> list[str]:
    """This model's query and value projections by their own names (ESM's 'query', 'value'), as PEFT names them."""
    try:
        return sorted({n.rpartition(".")[2] for alias in ("attn.q", "attn.v") for n in resolve(model, alias)})
    except TargetError:
        return ["q_proj", "v_proj"]


def _layers(name: str, value: Any, modules: list[str]) -> set[int] | None:
    """layers_to_transform as PEFT reads a module's block: the number after the last `.<name>.<n>.` of its name."""
    if value is None:
        return None
    chosen = {value} if isinstance(value, int) else set(value)
    for m in modules:
        peft_index = re.match(r".*\.[^.]*\.(\d+)\.", m)
        if (int(peft_index.group(1)) if peft_index else None) != layer_index(m):
            raise ValueError(
                f"{name}.layers_to_transform: PEFT reads {m!r} as block "
                f"{peft_index.group(1) if peft_index else None}, deltatune as {layer_index(m)}; select the modules "
                "with target_modules as a regex instead"
            )
    return chosen


def _check_saved_modules(name: str, saved: Any, model: nn.Module) -> None:
    """modules_to_save: deltatune trains a whole module only as the task head, by `train_head`."""
    if not saved:
        return
    heads = set(head_names(model))
    names = [n for n, _ in model.named_modules()]

    def in_the_head(saved: str) -> bool:  # PEFT matches modules_to_save as name suffixes (`classifier` in a wrapper)
        found = [n for n in names if n == saved or n.endswith("." + saved)]
        return bool(found) and all(in_head(n, heads) for n in found)

    others = sorted(m for m in saved if not in_the_head(m))
    if others:
        raise ValueError(
            f"{name}.modules_to_save={others}: deltatune trains whole modules only as the task head "
            f"({', '.join(sorted(heads)) or 'none here'}); leave them out, or tune them with a delta"
        )
    if not head_trains_by_default(model):
        raise ValueError(
            f"{name}.modules_to_save={sorted(saved)}: leave modules_to_save out and pass train_head=True to attach"
        )


CONFIG_READERS.append(read_peft_config)
