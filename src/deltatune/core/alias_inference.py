"""Aliases for a model type our tables do not list, read from its module names.

Each transformers release adds architectures, most of them named as an older one is (OLMo, Cohere, StableLM,
Helium, EXAONE as Llama; RoFormer, ERNIE, ESM, XLM-R XL, Longformer as BERT; XGLM, BioGPT as BART). Their
aliases were refused ("alias 'attn.q' is not mapped for model type 'olmo'"), so every method's defaults
failed on them. Where one of our tables names every core role of such a model in each of its layers (queries,
keys, values, the attention's output, the FFN's input and output), its aliases serve that model,
and a warning says which table was used.

`attn` and `xattn` (the attention modules themselves) are never inferred: prefix tuning hooks them, and how
an attention takes its keys (a KV cache, position biases, local windows as Longformer's) is checked family by
family (tests/test_arch_*.py); a name says nothing of it.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from .aliases import ALIASES

CANDIDATES = ("bert", "llama", "bart", "opt", "gpt2", "gpt_neox")  # in order: BART's table before OPT's
CORE = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out", "layer")
NOT_INFERRED = ("attn", "xattn")

_seen: dict[type, str | None] = {}  # model class -> the table its names follow (one answer per class)
_warned: set[str] = set()  # model types told about, once per process


def _matches(names: list[str], pattern: str) -> list[str]:
    compiled = re.compile(r"(?:.*\.)?" + pattern)
    return [n for n in names if compiled.fullmatch(n)]


def _fits(names: list[str], table: dict[str, str]) -> bool:
    """Every layer holds a module for each core role (LLama's FFN input is two: gate and up)."""
    layers = _matches(names, table["layer"])
    if not layers:
        return False
    for alias in CORE[:-1]:
        found = _matches(names, table[alias])
        if not all(any(m.startswith(layer + ".") for m in found) for layer in layers):
            return False
    return True


def follows(model: nn.Module) -> str | None:
    """The model type whose table names each of `model`'s core roles in every layer, or None."""
    cls = type(model)
    if cls not in _seen:
        names = [n for n, _ in model.named_modules()]
        _seen[cls] = next((c for c in CANDIDATES if _fits(names, ALIASES[c])), None)
    return _seen[cls]


def inferred_table(model: nn.Module, model_type: str) -> dict[str, str] | None:
    """The aliases of the table `model`'s names follow, without `attn`/`xattn`; warns which table, once."""
    canon = follows(model)
    if canon is None:
        return None
    if model_type not in _warned:
        _warned.add(model_type)
        warnings.warn(
            f"model type {model_type!r} is not in deltatune's alias tables; its module names follow {canon}'s, "
            "whose aliases (attn.q, ffn.out, ln, ...) are used for it; 'attn' is not (prefix tuning needs a mapped "
            "attention)",
            UserWarning,
            stacklevel=4,
        )
    return {a: p for a, p in ALIASES[canon].items() if a not in NOT_INFERRED}
