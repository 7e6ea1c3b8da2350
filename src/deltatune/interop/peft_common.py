"""What every PEFT format shares: the folder (adapter_config.json + adapter_model.safetensors), key
prefixes, the task head PEFT saves as `modules_to_save`, and atomic writing.

PEFT's injected-layer methods (LoRA, IA3, LN tuning) save their tensors under
`base_model.model.<module>.<name>` and the head under `base_model.model.<head>.*`; its prompt
learning methods (prompt and prefix tuning) save `prompt_embeddings` and the head under
`base_model.<head>.*`. PEFT itself is needed for neither direction; a `.bin` adapter (PEFT before 0.7) is read
with `torch.load(weights_only=True)` only (`tensor_files`): tensors and plain containers, no code runs.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import replacing_folder
from ..core.io import HEAD, check_one_head
from ..core.model import DeltaModel
from ..core.targeting import head_names, in_head
from .tensor_files import read_tensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # injected-layer methods
PROMPT_PREFIX = "base_model."  # prompt learning methods
TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "Model": "FEATURE_EXTRACTION",  # a bare model (BertModel): PEFT's prompt methods need a task type
}


# fields of every PEFT config that say what the adapter is for, not what it computes: metadata, the
# PeftModel wrapper (task_type; the prompt methods check theirs) and the saved head (check_head)
COMMON_FIELDS = frozenset(
    {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
     "inference_mode", "modules_to_save"}
)  # fmt: skip
# where an injected-layer method went: the saved tensors name the modules themselves
TARGETING_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})


ONE_HEAD_FIX = (
    "import each adapter with its own head onto a model of its own, or, if both were trained for one head, "
    "remove the head's tensors (modules_to_save) from this adapter's file"
)


class PeftFormatError(ValueError):
    """A PEFT folder deltatune cannot represent exactly; the message says what and why."""


def check_fields(
    config: dict,
    what: str,
    known: Collection[str],
    refused: Mapping[str, str] | None = None,
    ignore_fields: Collection[str] = (),
) -> None:
    """Refuse a config field the import would otherwise pass over while PEFT acts on it.

    `known`: the fields the import honors or that leave a trained adapter's outputs as they are
    (metadata, targeting, initialisation, training-only settings); `refused`: field -> what it is, for the
    fields that change the outputs in a way deltatune cannot represent. Any other field that is set (not
    null/false/empty) may be a later PEFT's that changes the outputs: refused in one line, unless the caller
    names it in `ignore_fields` (a refused field cannot be ignored: its effect is known)."""
    refused = refused or {}
    for key, meaning in refused.items():
        if config.get(key):
            raise PeftFormatError(
                f"this adapter uses {meaning}{'' if f'({key})' in meaning else f' ({key})'}; deltatune's {what} "
                "cannot represent it exactly"
            )
    allowed = COMMON_FIELDS | set(known) | set(refused) | set(ignore_fields)
    unknown = sorted(k for k, v in config.items() if v and k not in allowed)
    if unknown:
        shown = ", ".join(f"{k}={config[k]!r}" for k in unknown[:4])
        raise PeftFormatError(
            f"adapter_config.json sets {shown}, unknown to deltatune's {what} import (a later PEFT's?), and it may "
            f"change the outputs; if it does not, pass ignore_fields={unknown!r}"
        )


def check_bias(config: dict) -> None:
    """PEFT's `bias` other than 'none' also trains (and saves) the base layers' biases."""
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"this adapter also trains biases (bias={config['bias']!r}); import supports bias='none'")


def read_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not (folder / CONFIG).exists():
        inside = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG}")) if folder.is_dir() else []
        if inside:  # PEFT saves every adapter but "default" in a subfolder of its name
            raise PeftFormatError(
                f"{folder} holds PEFT adapters in subfolders ({', '.join(inside[:6])}): import each by its folder, "
                f"e.g. import_peft(model, '{folder / inside[0]}', name={inside[0]!r})"
            )
        raise PeftFormatError(f"{folder} has no {CONFIG}: not a PEFT adapter folder")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PeftFormatError(f"{folder / CONFIG} is not valid JSON ({err})") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise PeftFormatError(f"{folder / CONFIG} {_not_peft(config)}")
    # a field PEFT's config class has a default for may be left out of the file (PEFT fills it in on loading): an
    # adapter_config.json without lora_alpha was read with alpha = r, not PEFT's 8 (logits 0.16 to 6.4 off)
    config = {**PEFT_DEFAULTS.get(config["peft_type"], {}), **config}
    return config, read_tensors(folder, (WEIGHTS, "adapter_model.bin"), "save_pretrained", PeftFormatError)


# PEFT's defaults (its config dataclasses, 0.17 to 0.22) for the fields deltatune reads without a default of its own
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "LORA": {"r": 8, "lora_alpha": 8},
    "ADALORA": {"r": 8, "lora_alpha": 8, "target_r": 8, "init_r": 12, "tinit": 0, "tfinal": 0, "deltaT": 1},
    "LOHA": {"r": 8, "alpha": 8},
    "LOKR": {"r": 8, "alpha": 8},
    "VERA": {"r": 256},
    "OFT": {"r": 0, "oft_block_size": 32},
}


def _not_peft(config: object) -> str:
    """What an adapter_config.json without peft_type is: AdapterHub's `adapters` writes one of that name too."""
    if isinstance(config, dict) and isinstance(config.get("config"), dict) and "model_class" in config:
        kind = config["config"].get("architecture") or "bottleneck"
        return (
            f"is AdapterHub's (the `adapters` library, {config.get('version', 'unknown version')}: a {kind} adapter "
            f"{config.get('name', '')!r}), not PEFT's: load it with deltatune.interop.import_adapterhub(model, folder)"
        )
    return "has no peft_type: not a PEFT adapter config"


def read_adapter(
    folder: str | os.PathLike, peft_type: str, is_adapter: Callable[[str], bool], what: str
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, adapter tensors, head tensors) of a PEFT folder of `peft_type`; refuses another type or none of `what`."""
    config, tensors = read_folder(folder)
    if config.get("peft_type") != peft_type:
        raise PeftFormatError(f"this is a PEFT {config.get('peft_type')!r} adapter, not {peft_type}; use import_peft")
    adapter, head = split(tensors, PREFIX, is_adapter)
    if not adapter:
        raise PeftFormatError(f"{Path(folder) / WEIGHTS} holds no {what} tensors")
    return config, adapter, head


def exported_delta(dm: DeltaModel, name: str, methods: tuple[str, ...], what: str, fmt: str) -> Any:
    """The delta `name`, refused unless its method is one of `methods` (those `fmt` can hold)."""
    delta = dm.delta(name)
    if delta.config.method not in methods:
        raise PeftFormatError(f"only {what} deltas export to PEFT's {fmt}; {name!r} is {delta.config.method}")
    return delta


def write_folder(folder: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Both files into a temporary folder, then renamed into place: never half an adapter."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and any(p.name not in (CONFIG, WEIGHTS, "README.md") for p in folder.iterdir()):
        raise FileExistsError(f"{folder} exists and holds other files; choose a new folder")
    with replacing_folder(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS), {"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def split(tensors: dict[str, torch.Tensor], prefix: str, is_adapter) -> tuple[dict, dict]:  # noqa: ANN001
    """(adapter tensors, head tensors), keyed by their names inside the model (prefix removed)."""
    adapter, head = {}, {}
    for key, value in tensors.items():
        inner = key.removeprefix(prefix)
        if is_adapter(inner):
            adapter[inner] = value
        else:
            head[inner.replace(".modules_to_save.default.", ".")] = value
    return adapter, head


def check_head(dm: DeltaModel, head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Before anything is attached: every saved head tensor has a place of the same shape, and no delta already
    on the model depends on the head this one would replace (core.io.check_one_head). Returns the head to copy.

    PEFT's `save_embedding_layers="auto"` also writes the untouched base weight of a targeted `lm_head` or
    embedding (`lm_head.base_layer.weight`); such a copy must equal the model's weight and is not copied."""
    params = dict(dm.backbone.named_parameters())
    head = dict(head)
    for key in [k for k in head if ".base_layer." in k]:
        own = _parameter(dm.backbone, key.replace(".base_layer.", "."))
        saved = head.pop(key)
        if own is None or own.shape != saved.shape or not torch.equal(own.detach().cpu(), saved.to(own.dtype)):
            raise PeftFormatError(
                f"the adapter saves {key!r}, the base weight under its delta, and this model's differs: another "
                "base model, or embeddings resized differently"
            )
    shared = {id(p): n for n, p in params.items()}
    for k in head:  # a tied weight (GPT-2's lm_head is the input embeddings) is listed under its first name only
        tied = _parameter(dm.backbone, k) if k not in params else None
        if tied is not None and id(tied) in shared:
            raise PeftFormatError(
                f"the adapter saves a trained {k!r} (modules_to_save), which this model ties to {shared[id(tied)]!r}: "
                "PEFT's copy is untied, deltatune's head would change both; load the model untied "
                "(from_pretrained(..., tie_word_embeddings=False)) to import it"
            )
    missing = sorted(k for k in head if k not in params)
    if missing:
        raise PeftFormatError(f"the adapter saves head tensors this model lacks: {missing[:4]}")
    # besides the method's own tensors only the task head may be written: no file changes other backbone weights
    stray = sorted(set(head) - set(dm.head_parameter_names()))
    if stray:
        raise PeftFormatError(
            f"the adapter saves {stray[0]!r}, a backbone weight that is not the task head; deltatune imports "
            "only the method's tensors and the task head (modules_to_save other than the head are not supported)"
        )
    for k, v in head.items():
        if params[k].shape != v.shape:
            raise PeftFormatError(
                f"the adapter's head tensor {k!r} has shape {tuple(v.shape)}, this model's {tuple(params[k].shape)}: "
                "load the backbone with the same number of labels"
            )
    check_one_head(dm, "the adapter", head, ONE_HEAD_FIX)
    return head


def _parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


@torch.no_grad()
def copy_head(dm: DeltaModel, head: dict[str, torch.Tensor], name: str) -> None:
    """The adapter's head into the model, recorded as delta `name`'s (a later import with another is refused)."""
    params = dict(dm.backbone.named_parameters())
    for key, value in head.items():
        params[key].copy_(value.to(params[key].dtype))
    if head:
        dm.freeze(train_head=True)  # PEFT trained it (modules_to_save); keep training it
        dm._head_source = name


def head_for_export(
    dm: DeltaModel, prefix: str, include_head: bool | None
) -> tuple[dict[str, torch.Tensor], list | None]:
    """The head tensors under PEFT's keys, and the `modules_to_save` naming their modules.

    `include_head=None` (the exporters' default): the head, unless it is a language model's own head that
    neither trains nor came with a loaded delta. That one is the base checkpoint's: saving it wrote a
    vocabulary x hidden copy into every causal LM's adapter and made PEFT train it (`modules_to_save`). A
    classifier's head is always saved: the base checkpoint holds none, or a random one."""
    if include_head is None:
        generative = task_type(dm.backbone) in ("CAUSAL_LM", "SEQ_2_SEQ_LM")
        names = dm.head_parameter_names()
        params = dict(dm.backbone.named_parameters())
        trained = any(params[n].requires_grad for n in names) or getattr(dm, "_head_source", None) in dm.deltas
        include_head = not generative or trained
    if not include_head:
        return {}, None
    tensors = {prefix + k.removeprefix(HEAD): v for k, v in dm.head_state_dict().items()}
    heads = sorted({n.split(".")[0] for n in dm.head_parameter_names()})
    return tensors, heads or None


def check_sites_outside_head(dm: DeltaModel, sites: Any, modules_to_save: list | None) -> None:
    """Refuse a delta on a module PEFT replaces by a saved copy: `modules_to_save` (and the head of a
    classifier, which PEFT's SEQ_CLS/TOKEN_CLS add themselves) is wrapped, and the adapter's tensors on it
    are dropped with a warning at most, so the exported adapter would compute other outputs."""
    wrapped = set(modules_to_save or ())
    if task_type(dm.backbone) in ("SEQ_CLS", "TOKEN_CLS"):
        wrapped |= set(head_names(dm.backbone))
    on_head = sorted(s for s in sites if in_head(s, wrapped))
    if on_head:
        raise PeftFormatError(
            f"the delta sits on {on_head[0]!r}, part of the task head that PEFT saves whole (modules_to_save) and "
            "would load without the delta: the export would give other outputs; attach the delta to backbone "
            "modules only and train the head with train_head=True, export with include_head=False if the head "
            "did not train, or export_merged for a plain checkpoint"
        )


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((t for suffix, t in TASK_TYPES.items() if name.endswith(suffix)), None)


def base_config(dm: DeltaModel, peft_type: str, modules_to_save: list | None) -> dict[str, Any]:
    return {
        "peft_type": peft_type,
        "task_type": task_type(dm.backbone),
        "base_model_name_or_path": getattr(dm.backbone.config, "_name_or_path", None) or None,
        "modules_to_save": modules_to_save,
        "inference_mode": True,
    }


def as_delta_model(model: nn.Module) -> DeltaModel:
    return model if isinstance(model, DeltaModel) else DeltaModel(model)


ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("deltatune_peft_import_enabled", default=True)


def add_imported(dm: DeltaModel, name: str, config: Any) -> None:
    """`dm.add` of an imported adapter's delta, switched on unless `import_peft(..., enabled=False)` is running (two
    LayerNorm adapters claim the same weights: the second must come in switched off, not fail on enabling)."""
    dm.add(name, config, enabled=ENABLED.get())
