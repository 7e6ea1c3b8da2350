"""PEFT LoRA folders (adapter_config.json + adapter_model.safetensors) in and out.

Users arrive with LoRA adapters trained in PEFT and leave with ones PEFT must load. Both layouts
store A as (r, in) and B as (out, r) per module (GPT-2's Conv1D included: PEFT marks it with
`fan_in_fan_out`), so the mapping is a renaming; what needs care is the scaling (rsLoRA uses
alpha / sqrt(r)), the task head PEFT saves as `modules_to_save`, and refusing what we cannot
represent (DoRA, per-module ranks, trained biases) instead of loading it wrongly. PEFT itself is
not needed for either direction; `.bin` adapters are refused because they are pickles.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..core.delta import safe_key
from ..core.layers import is_transposed
from ..core.model import DeltaModel
from ..core.targeting import resolve
from ..methods.reparameterization.lora import LoRAConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForTokenClassification": "TOKEN_CLS",
}


class PeftFormatError(ValueError):
    """A PEFT folder deltatune cannot represent exactly; the message says what and why."""


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not (folder / CONFIG).exists():
        raise PeftFormatError(f"{folder} has no {CONFIG}: not a PEFT adapter folder")
    if not (folder / WEIGHTS).exists():
        bin_file = folder / "adapter_model.bin"
        hint = (
            " (it has adapter_model.bin, a pickle: re-save it with safe_serialization=True)"
            if bin_file.exists()
            else ""
        )
        raise PeftFormatError(f"{folder} has no {WEIGHTS}{hint}")
    config = json.loads((folder / CONFIG).read_text())
    return config, load_file(str(folder / WEIGHTS))


def _check(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"only PEFT LoRA adapters can be imported, this one is {config.get('peft_type')!r}")
    unsupported = {
        "use_dora": "DoRA",
        "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas",
        "lora_bias": "trained LoRA biases",
        "layer_replication": "layer replication",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise PeftFormatError(f"this adapter uses {what} ({key}); deltatune's LoRA cannot represent it exactly")
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"this adapter also trains biases (bias={config['bias']!r}); import supports bias='none'")


def import_peft_lora(model: nn.Module, folder: str | os.PathLike, name: str = "default") -> DeltaModel:
    """Attach a PEFT LoRA adapter as a deltatune LoRA delta (and copy its saved task head)."""
    folder = Path(folder)
    config, tensors = _read(folder)
    _check(config)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        inner = key.removeprefix(PREFIX)
        for part in ("A", "B"):
            marker = f".lora_{part}.weight"
            if inner.endswith(marker):
                factors.setdefault(inner[: -len(marker)], {})[part] = value
                break
        else:
            head[inner.replace(".modules_to_save.default.", ".")] = value
    if not factors:
        raise PeftFormatError(f"{folder / WEIGHTS} holds no lora_A/lora_B tensors")
    broken = sorted(m for m, f in factors.items() if set(f) != {"A", "B"})
    if broken:
        raise PeftFormatError(f"modules with only one LoRA factor in {WEIGHTS}: {broken[:4]}")
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    if config.get("use_rslora"):
        alpha *= math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r); ours is alpha / r
    lora = LoRAConfig(targets=tuple(factors), r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)))
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    resolve(dm.backbone, tuple(factors))  # the adapter's modules must exist: a TargetError names close ones
    params = dict(dm.backbone.named_parameters())
    missing = sorted(k for k in head if k not in params)
    if missing:
        raise PeftFormatError(f"the adapter saves head tensors this model lacks: {missing[:4]}")
    # besides LoRA factors only the task head may be written: no file can change other backbone weights
    stray = sorted(set(head) - set(dm.head_parameter_names()))
    if stray:
        raise PeftFormatError(
            f"the adapter saves {stray[0]!r}, a backbone weight that is not the task head; deltatune imports "
            "only LoRA factors and the task head (modules_to_save other than the head are not supported)"
        )
    wrong = [k for k in head if head[k].shape != params[k].shape]
    if wrong:
        raise PeftFormatError(
            f"the adapter's {wrong[0]!r} has shape {tuple(head[wrong[0]].shape)}, this model's "
            f"{tuple(params[wrong[0]].shape)}: load the backbone with the adapter's number of labels"
        )
    dm.add(name, lora)
    delta = dm.delta(name)
    with torch.no_grad():
        for module, f in factors.items():
            layer = delta.layers[safe_key(module)]
            for part in ("A", "B"):
                target = getattr(layer, part)
                if target.shape != f[part].shape:
                    dm.detach(name)
                    raise PeftFormatError(
                        f"{module}.lora_{part} has shape {tuple(f[part].shape)}, "
                        f"this model needs {tuple(target.shape)}: another base model?"
                    )
                target.copy_(f[part])
        for key, value in head.items():
            params[key].copy_(value.to(params[key].dtype))
    return dm


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)


def export_peft_lora(
    dm: DeltaModel, folder: str | os.PathLike, name: str = "default", include_head: bool = True
) -> Path:
    """Write a LoRA delta as a PEFT adapter folder that `PeftModel.from_pretrained` loads."""
    from safetensors.torch import save_file

    delta = dm.delta(name)
    if delta.config.method != "lora":
        raise PeftFormatError(f"only LoRA deltas export to PEFT's LoRA format; {name!r} is {delta.config.method}")
    cfg: LoRAConfig = delta.config
    modules = list(delta.sites)
    tensors = {}
    for module in modules:
        layer = delta.layers[safe_key(module)]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = layer.A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = layer.B.detach().contiguous().cpu()
    heads = sorted({n.split(".")[0] for n in dm.head_parameter_names()}) if include_head else []
    if include_head:
        for key, value in dm.head_state_dict().items():
            tensors[PREFIX + key.removeprefix("__head__.")] = value.contiguous().cpu()
    fan_in_fan_out = any(is_transposed(dm.backbone.get_submodule(m)) for m in modules)
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(dm.backbone),
        "base_model_name_or_path": getattr(dm.backbone.config, "_name_or_path", None) or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        if folder.exists():
            if any(p.name not in (CONFIG, WEIGHTS, "README.md") for p in folder.iterdir()):
                raise FileExistsError(f"{folder} exists and holds other files; choose a new folder")
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
