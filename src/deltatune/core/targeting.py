"""Select backbone modules by exact name, suffix, regex or common-structure alias.

A target string is one of:
  * an alias from `core.aliases` (`attn.q`, `ffn.out`, `ln`, `head`, ...), optionally restricted
    to one side of an encoder-decoder with `encoder:` or `decoder:` (`decoder:attn.q`);
  * `re:<pattern>`: a regular expression that must match the whole qualified name;
  * `all-linear`: every linear layer (nn.Linear, GPT-2's Conv1D) outside the task or LM head, as PEFT's
    `target_modules="all-linear"` (QLoRA's recipe);
  * anything else: an exact qualified name, or a suffix of one at a dot boundary (`query`).
A target that selects nothing is an error listing the closest names, never a silent no-op:
a typo in a target list would otherwise train a different model than the user asked for.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

import transformers
from torch import nn

from .alias_inference import follows, inferred_table
from .aliases import ALIAS_NAMES, ALIASES, WHY_ABSENT
from .layers import is_linear

Targets = str | Sequence[str] | None
Layers = int | str | Sequence[int] | None

# ALBERT's shared layer is `albert_layer_groups.0.albert_layers.0`: one block, called at every depth
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|albert_layers)\.(\d+)(?:\.|$)")
_SIDES = ("encoder", "decoder")
ALL_LINEAR = "all-linear"


class TargetError(ValueError):
    """A target or layer selection that does not fit the model."""


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "") or ""


def backbone_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified names of the backbone's own modules, without deltatune's bookkeeping."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and ".parametrizations" not in name and not name.startswith("parametrizations")
    }


def layer_index(name: str) -> int | None:
    """The transformer block a module lives in, read from its name (`...layer.3.attention`)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def block_of(name: str) -> str | None:
    """The transformer block a module belongs to: its qualified name up to the layer number."""
    match = _LAYER_RE.search(name)
    return name[: match.end(1)] if match else None


def side_of(name: str) -> str | None:
    parts = name.split(".")
    for side in _SIDES:
        if side in parts:
            return side
    return None


def held_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers models inside a module that is none itself, with their names (a sentence-transformers
    model holds its transformer at `0.model`); none for a transformers model."""
    if isinstance(model, transformers.PreTrainedModel):
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, transformers.PreTrainedModel) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found


def held_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """`held_models`' one model, or None where there are none or several."""
    held = held_models(model)
    return held[0] if len(held) == 1 else None


def in_head(name: str, heads: Iterable[str]) -> bool:
    """Whether module or parameter `name` lies in one of the head modules `heads`."""
    return any(name == h or name.startswith(h + ".") for h in heads)


def head_names(model: nn.Module) -> list[str]:
    """Top-level children outside the base model: the task head (classifier, lm_head, ...).

    Models without a base-model attribute (T5ForConditionalGeneration keeps encoder and decoder
    at the top) have their output embeddings as the head, and the linear layers beside the stacks
    (T5ForQuestionAnswering's `qa_outputs`, which was otherwise left frozen and random). A module holding
    one transformers model (a CrossEncoder's classifier) has that model's head, named from the module.
    """
    if (held := held_model(model)) is not None:
        return [f"{held[0]}.{h}" for h in head_names(held[1])]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return [name for name, _ in model.named_children() if name != prefix]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [
        name for name, child in model.named_children() if (out is not None and child is out) or type(child) is nn.Linear
    ]


def parse_layers(layers: Layers, n_layers: int) -> set[int]:
    """`6-11`, `0,2,4`, `9:` (slice), `-2` (from the end), or a list of ints."""
    if layers is None:
        return set(range(n_layers))
    if isinstance(layers, int):
        items: list[str] = [str(layers)]
    elif isinstance(layers, str):
        items = [s.strip() for s in layers.split(",") if s.strip()]
    else:
        items = [str(int(i)) for i in layers]
    chosen: set[int] = set()
    for item in items:
        try:
            if ":" in item:
                start, _, stop = item.partition(":")
                chosen.update(range(n_layers)[slice(int(start) if start else None, int(stop) if stop else None)])
            elif re.fullmatch(r"\d+-\d+", item):
                lo, hi = (int(x) for x in item.split("-"))
                if hi >= n_layers:  # refused before a range of 10**8 layers is built
                    raise TargetError(f"layers {item} do not exist: the model has layers 0-{n_layers - 1}")
                chosen.update(range(lo, hi + 1))
            else:
                i = int(item)
                if not -n_layers <= i < n_layers:  # named as written: -3 on 2 layers, not the -1 it becomes
                    raise TargetError(
                        f"layer {i} does not exist: the model has layers 0-{n_layers - 1} (-{n_layers}..-1 from the end)"
                    )
                chosen.add(i + n_layers if i < 0 else i)
        except TargetError:
            raise
        except ValueError as err:
            raise TargetError(f"cannot read layer selection {item!r}: use e.g. '6-11', '0,2', '9:' or -2") from err
    bad = sorted(i for i in chosen if not 0 <= i < n_layers)
    if bad:
        shown = f"{bad[:8]}"[:-1] + (", ...]" if len(bad) > 8 else "]")
        raise TargetError(f"layers {shown} do not exist: the model has layers 0-{n_layers - 1}")
    return chosen


def _alias_pattern(model: nn.Module, alias: str) -> re.Pattern[str] | None:
    mtype = model_type(model)
    table = ALIASES.get(mtype) or inferred_table(model, mtype)
    if table is None or alias not in table:
        return None
    return re.compile(r"(?:.*\.)?" + table[alias])


def _match_one(model: nn.Module, names: Iterable[str], target: str) -> list[str]:
    names = list(names)
    side = None
    if ":" in target and not target.startswith("re:"):
        side, _, target = target.partition(":")
        if side not in _SIDES:
            raise TargetError(f"unknown side {side!r} in target; use 'encoder:' or 'decoder:'")
    if target == "head":
        heads = head_names(model)
        found = [n for n in names if in_head(n, heads)]
    elif target.lower() == ALL_LINEAR:
        found = _all_linear(model, names)
    elif target.startswith("re:"):
        try:
            pattern = re.compile(target[3:])
        except re.error as err:
            raise TargetError(f"invalid regex in target {target!r}: {err}") from err
        found = [n for n in names if pattern.fullmatch(n)]
    elif target in ALIAS_NAMES:
        pattern = _alias_pattern(model, target)
        if pattern is None:
            mtype = model_type(model)
            if mtype in ALIASES:  # the model type is known, this alias is not part of it (xattn on a decoder)
                has = ", ".join(a for a in ALIASES[mtype] if a in ALIAS_NAMES)
                why = WHY_ABSENT.get(mtype, {}).get(target)
                where = f"{mtype!r} has no {target!r}" + (f": {why}" if why else "") + f" (its aliases: {has})"
            elif (canon := follows(model)) is not None:  # inferred from the names; attn/xattn never are
                where = (
                    f"alias {target!r} is not mapped for model type {mtype!r}, whose other aliases follow {canon}'s "
                    "module names (the attention modules, and norms named otherwise, are mapped family by family)"
                )
            else:
                where = (
                    f"alias {target!r} is not mapped for model type {mtype!r} (mapped: {', '.join(sorted(ALIASES))})"
                )
            raise TargetError(f"{where}; target modules by name or 're:<regex>' instead")
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        found = [n for n in names if n == target or n.endswith("." + target)]
    if side is not None:
        found = [n for n in found if side_of(n) == side]
    return found


def _all_linear(model: nn.Module, names: list[str]) -> list[str]:
    """The linear layers outside the head: the output embeddings (LM head) and the task head stay as they are,
    as PEFT's "all-linear" leaves them (the head trains with `train_head`, not through a delta)."""
    modules = dict(model.named_modules())
    heads = set(head_names(model))
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return [n for n in names if is_linear(modules[n]) and modules[n] is not out and not in_head(n, heads)]


def _closest(model: nn.Module, names: list[str], target: str) -> list[str]:
    target = target.split(":", 1)[-1]
    candidates = set(names) | {n.rsplit(".", 1)[-1] for n in names} | set(ALIAS_NAMES) | {ALL_LINEAR}
    close = difflib.get_close_matches(target, sorted(candidates), n=6, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(target.rsplit(".", 1)[-1], sorted(candidates), n=6, cutoff=0.4)
    return close


def resolve(model: nn.Module, targets: Targets, layers: Layers = None) -> list[str]:
    """Qualified names of the modules selected by `targets` (in model order), restricted to `layers`.

    `targets=None` selects every module (for methods that then filter by parameter kind).
    """
    modules = backbone_modules(model)
    names = list(modules)
    if targets is None:
        selected = names
    else:
        target_list = [targets] if isinstance(targets, str) else list(targets)
        if not target_list:
            raise TargetError("empty target list: name at least one module, alias or 're:<regex>'")
        chosen: set[str] = set()
        for target in target_list:
            if not isinstance(target, str):
                raise TargetError(f"targets must be strings, got {target!r}")
            found = _match_one(model, names, target)
            if not found:
                close = _closest(model, names, target)
                hint = f"; closest names: {', '.join(close)}" if close else ""
                raise TargetError(f"target {target!r} matches no module of {type(model).__name__}{hint}")
            chosen.update(found)
        selected = [n for n in names if n in chosen]
    if layers is not None:
        indexed = [layer_index(n) for n in names]
        n_layers = max((i for i in indexed if i is not None), default=-1) + 1
        if n_layers == 0:
            raise TargetError(f"{type(model).__name__} has no numbered layers to select from")
        keep = parse_layers(layers, n_layers)
        selected = [n for n in selected if layer_index(n) in keep]
        if not selected:
            raise TargetError(f"no targeted module lies in layers {sorted(keep)}")
    return selected


HEAD_KEY = "__head__."  # the prefix of task head tensors in a delta's state and files (never a module name)


def plain_name(name: str) -> str:
    """A parameter's backbone name, also while a parametrization wraps it (`x.parametrizations.weight.original`)
    or FSDP1 wraps its block (`layer.0._fsdp_wrapped_module.attention...`)."""
    return name.replace(".parametrizations.", ".").replace(".original", "").replace("_fsdp_wrapped_module.", "")


# Task models whose head is new for the task (transformers initializes it randomly): a delta alone
# would train against a frozen random projection. PEFT's task types train the same heads
# (modules_to_save: classifier, score, qa_outputs).
# ViT's and Whisper's classifiers too: before, `attach(ViTForImageClassification, "lora")` left its new classifier frozen.
TRAINED_HEADS = (
    "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice",
    "ForImageClassification", "ForAudioClassification",
)  # fmt: skip


def head_trains_by_default(model: nn.Module) -> bool:
    """What train_head="auto" means: train the head of classification, QA and multiple-choice models;
    leave LM heads (pretrained, usually tied to the embeddings) and bare models alone."""
    inner = held[1] if (held := held_model(model)) is not None else model
    return type(inner).__name__.endswith(TRAINED_HEADS) and bool(head_names(model))
