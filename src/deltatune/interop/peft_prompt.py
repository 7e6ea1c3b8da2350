"""PEFT prompt tuning and prefix tuning folders in and out.

Both save one tensor, `prompt_embeddings`:
- prompt tuning: (num_virtual_tokens x num_transformer_submodules, token_dim), the vectors put in
  front of the input embeddings; deltatune's prompt holds the same (num_tokens, dim) `prompt`.
  PEFT's default for encoder-decoders (2 submodules) also prepends vectors to the decoder, which
  deltatune does not: such adapters are refused (train them with num_transformer_submodules=1).
- prefix tuning: (num_virtual_tokens, num_layers x 2 x kv_width), each layer's keys then values,
  heads first, exactly the order deltatune's per-attention (2, num_tokens, kv_width) prefixes
  flatten to once the reparameterization MLP is dropped (PEFT, too, saves the MLP's output).
  PEFT prefixes only the decoder of an encoder-decoder (pairing one layer's self-attention
  prefix with another's for cross-attention) and refuses encoder-only models, so only
  decoder-only models map.

Positions: PEFT numbers the virtual tokens first and moves the real tokens up by
num_virtual_tokens. Imported prompts and prefixes get `positions="shift"`, which numbers the
same way, so they compute PEFT's outputs. Exported, a "shift" delta is exact; a "keep" one (the
default for deltatune-trained deltas) is exact only on relative-position models (T5), and is
refused elsewhere unless `positions_may_differ=True` says the caller accepts the difference.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from ..core.model import DeltaModel
from ..methods.addition.prefix import PrefixConfig
from ..methods.addition.prompt import PromptConfig
from .peft_common import (
    PROMPT_PREFIX,
    WEIGHTS,
    PeftFormatError,
    add_imported,
    as_delta_model,
    base_config,
    check_fields,
    check_head,
    copy_head,
    exported_delta,
    head_for_export,
    read_folder,
    split,
    task_type,
    write_folder,
)
from .peft_names import all_or_nothing

KEY = "prompt_embeddings"
RELATIVE_POSITIONS = ("t5", "mt5", "umt5", "longt5")  # no position embeddings a shift could change
# PEFT config fields (0.21) the imports honor or that leave the outputs unchanged. Both: num_virtual_tokens and
# token_dim (the tensor's shape says them), num_transformer_submodules (checked). Prompt tuning: the layer and
# head counts (unused) and the init. Prefix tuning: the cache layout (the tensor's width and num_layers are
# checked), the init, and the MLP (PEFT saves its output, which is what it runs in inference mode).
PROMPT_FIELDS = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                  "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                  "tokenizer_kwargs"}  # fmt: skip
PREFIX_FIELDS = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                  "num_layers", "init_weights", "encoder_hidden_size", "prefix_projection"}  # fmt: skip
_FIELDS = {"PROMPT_TUNING": ("prompt tuning", PROMPT_FIELDS), "PREFIX_TUNING": ("prefix tuning", PREFIX_FIELDS)}
# the task types under which PEFT prepends the prompt (its MODEL_TYPE_TO_PEFT_MODEL_MAPPING); a plain PeftModel
# (task_type None or another) runs the base model alone, so its outputs are the base model's
PEFT_TASKS = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def _check_positions(delta: nn.Module, model: nn.Module, what: str, positions_may_differ: bool) -> None:
    """Refuse exporting a delta that numbers positions unlike PEFT where that changes the outputs."""
    if delta.config.positions == "shift" or positions_may_differ:
        return
    if getattr(model.config, "model_type", None) in RELATIVE_POSITIONS:
        return
    raise PeftFormatError(
        f"this {what} delta keeps the real tokens' positions (positions='keep') and PEFT moves them up by the "
        f"number of virtual tokens, so on {type(model).__name__} (absolute or rotary positions) PEFT would compute "
        "other outputs; train with positions='shift' to export exactly, or pass positions_may_differ=True"
    )


def _check_pooling(model: nn.Module, outputs_may_differ: bool) -> None:
    """PEFT runs a sequence classifier on [prompt; text], so a head that pools a position of the
    stack's output reads a prompt vector's (RoBERTa, DistilBERT: the first position) or ignores
    padding (GPT-2, Llama: the last position); deltatune's head reads the real tokens. Only a pooler
    inside the stack (BERT's, over the first position in both) gives PEFT's outputs."""
    if outputs_may_differ or "ForSequenceClassification" not in type(model).__name__:
        return
    if getattr(getattr(model, "base_model", None), "pooler", None) is None:
        raise PeftFormatError(
            f"PEFT's prompt tuning feeds {type(model).__name__}'s classifier the prompt positions too (it pools a "
            "virtual token, or the last position whatever the padding) and deltatune's classifier reads the real "
            "tokens, so this head would compute other outputs; pass outputs_may_differ=True to import anyway "
            "(then train the head a little)"
        )


def _check_task(model: nn.Module, what: str) -> None:
    """Exporting: PEFT prepends the vectors only under a task type, which the model class gives (TASK_TYPES)."""
    if task_type(model) not in PEFT_TASKS:
        raise PeftFormatError(
            f"{type(model).__name__} maps to no PEFT task type, so PEFT would load this {what} delta into a plain "
            f"PeftModel that never prepends it (its outputs would be the base model's); PEFT's {what} runs on "
            "classifiers, token classifiers, causal and seq2seq LMs and bare models"
        )


def _read(folder: Path, peft_type: str, ignore_fields: Collection[str]) -> tuple[dict, torch.Tensor, dict]:
    config, tensors = read_folder(folder)
    if config.get("peft_type") != peft_type:
        raise PeftFormatError(f"this is a PEFT {config.get('peft_type')!r} adapter, not {peft_type}; use import_peft")
    what, known = _FIELDS[peft_type]
    check_fields(config, what, known, None, ignore_fields)
    if config.get("task_type") not in PEFT_TASKS:
        raise PeftFormatError(
            f"adapter_config.json has task_type={config.get('task_type')!r}, under which PEFT never prepends the "
            f"{what} vectors (its outputs are the base model's, so they were not trained either); a {what} adapter "
            f"needs one of {', '.join(PEFT_TASKS)}"
        )
    if KEY not in tensors:
        raise PeftFormatError(f"{folder / WEIGHTS} holds no {KEY}")
    _, head = split(tensors, PROMPT_PREFIX, lambda k: k == KEY)
    return config, tensors[KEY], head


@all_or_nothing
def import_peft_prompt(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str = "default",
    *,
    outputs_may_differ: bool = False,
    ignore_fields: Collection[str] = (),
) -> DeltaModel:
    """Attach a PEFT prompt tuning adapter as a deltatune prompt delta numbering positions as PEFT does
    (and copy its saved task head). `ignore_fields`: adapter_config.json fields unknown to this import that
    you know leave the outputs as they are."""
    folder = Path(folder)
    config, embeddings, head = _read(folder, "PROMPT_TUNING", ignore_fields)
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise PeftFormatError(
            "this prompt also prepends vectors to the decoder (num_transformer_submodules=2, PEFT's default for "
            "encoder-decoders); deltatune prompts the encoder only: train with num_transformer_submodules=1"
        )
    dm = as_delta_model(model)
    _check_pooling(dm.backbone, outputs_may_differ)
    head = check_head(dm, head)
    add_imported(dm, name, PromptConfig(num_tokens=int(embeddings.shape[0]), positions="shift"))
    prompt = dm.delta(name).prompt
    if prompt.shape != embeddings.shape:
        dm.detach(name)
        raise PeftFormatError(f"{KEY} has shape {tuple(embeddings.shape)}, this model needs {tuple(prompt.shape)}")
    with torch.no_grad():
        prompt.copy_(embeddings)
    copy_head(dm, head, name)
    return dm


def export_peft_prompt(
    dm: DeltaModel,
    folder: str | os.PathLike,
    name: str = "default",
    include_head: bool | None = None,
    *,
    positions_may_differ: bool = False,
    outputs_may_differ: bool = False,
) -> Path:
    """Write a prompt delta as a PEFT prompt tuning folder."""
    delta = exported_delta(dm, name, ("prompt",), "prompt", "PROMPT_TUNING")
    _check_task(dm.backbone, "prompt")
    _check_positions(delta, dm.backbone, "prompt", positions_may_differ)
    _check_pooling(dm.backbone, outputs_may_differ)
    tensors, heads = head_for_export(dm, PROMPT_PREFIX, include_head)
    tensors[KEY] = delta.prompt.detach()
    cfg = dm.backbone.config
    config = base_config(dm, "PROMPT_TUNING", heads) | {
        "num_virtual_tokens": int(delta.prompt.shape[0]),
        "token_dim": int(delta.prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": _get(cfg, "num_attention_heads", "num_heads", "n_head"),
        "num_layers": _get(cfg, "num_hidden_layers", "num_layers", "n_layer"),
        "prompt_tuning_init": "RANDOM",
    }
    return write_folder(folder, config, tensors)


def _get(cfg: object, *names: str) -> int | None:
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)


def _check_decoder_only(model: nn.Module) -> None:
    """PEFT's own rule (it refuses models whose forward takes no past_key_values), plus encoder-decoders."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    takes_cache = "past_key_values" in params or "cache" in params  # transformers 5.24 renamed it "cache"
    if getattr(model.config, "is_encoder_decoder", False) or not takes_cache:
        raise PeftFormatError(
            f"PEFT prefix tuning only maps onto decoder-only models; {type(model).__name__} is not one "
            "(PEFT prefixes only the decoder of an encoder-decoder, pairing layers deltatune does not, and "
            "refuses models without a KV cache)"
        )


@all_or_nothing
def import_peft_prefix(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", *, ignore_fields: Collection[str] = ()
) -> DeltaModel:
    """Attach a PEFT prefix tuning adapter as a deltatune prefix delta without reparameterization,
    numbering positions as PEFT does. `ignore_fields`: as import_peft_prompt's."""
    folder = Path(folder)
    config, embeddings, head = _read(folder, "PREFIX_TUNING", ignore_fields)
    dm = as_delta_model(model)
    _check_decoder_only(dm.backbone)
    head = check_head(dm, head)
    n = int(embeddings.shape[0])
    add_imported(dm, name, PrefixConfig(num_tokens=n, reparameterize=False, positions="shift"))
    delta = dm.delta(name)
    sites = delta._sites
    width = sum(s.width for s in sites)
    if embeddings.shape[1] != 2 * width or int(config.get("num_layers", len(sites))) != len(sites):
        dm.detach(name)
        copies = {s.copies for s in sites}
        if embeddings.shape[1] == 2 * width * max(copies) != 2 * width:  # PEFT gave every query head its own keys
            raise PeftFormatError(
                f"{KEY} has a prefix for every query head ({tuple(embeddings.shape)}): this transformers release's "
                f"{type(dm.backbone).__name__} caches a copy of each key/value group per query head, and deltatune's "
                "prefix has one per group (the 5.x layout), so these keys cannot be loaded exactly"
            )
        raise PeftFormatError(
            f"{KEY} has shape {tuple(embeddings.shape)} for {config.get('num_layers')} layers; this model has "
            f"{len(sites)} attention layers needing (n, {2 * width}): another base model?"
        )
    with torch.no_grad():
        offset = 0
        for site in sites:
            kv = embeddings[:, offset : offset + 2 * site.width].reshape(n, 2, site.width).transpose(0, 1)
            delta.prefixes[site.key].copy_(kv)
            offset += 2 * site.width
    copy_head(dm, head, name)
    return dm


def export_peft_prefix(
    dm: DeltaModel,
    folder: str | os.PathLike,
    name: str = "default",
    include_head: bool | None = None,
    *,
    positions_may_differ: bool = False,
) -> Path:
    """Write a prefix delta as a PEFT prefix tuning folder (its MLP, if any, evaluated first)."""
    delta = exported_delta(dm, name, ("prefix",), "prefix", "PREFIX_TUNING")
    _check_task(dm.backbone, "prefix")
    _check_decoder_only(dm.backbone)
    _check_positions(delta, dm.backbone, "prefix", positions_may_differ)
    with torch.no_grad():
        parts = [delta.prefix(s).detach().transpose(0, 1).reshape(delta.config.num_tokens, -1) for s in delta._sites]
    tensors, heads = head_for_export(dm, PROMPT_PREFIX, include_head)
    tensors[KEY] = torch.cat(parts, dim=1)
    cfg = dm.backbone.config
    width = delta._sites[0].width
    heads_kv = _get(cfg, "num_key_value_heads") or _get(cfg, "num_attention_heads", "n_head")
    config = base_config(dm, "PREFIX_TUNING", heads) | {
        "num_virtual_tokens": delta.config.num_tokens,
        "token_dim": width,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads_kv,
        "num_layers": len(delta._sites),
        "encoder_hidden_size": width,
        "prefix_projection": False,
    }
    return write_folder(folder, config, tensors)
