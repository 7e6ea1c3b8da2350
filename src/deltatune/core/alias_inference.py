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

# (model class, its module names) -> (table followed, its aliases): a config can add or drop modules (norms)
_seen: dict[tuple[type, int], tuple[str, dict[str, str]] | None] = {}
_warned: set[str] = set()  # model types told about, once per process


def _matches(names: list[str], pattern: str) -> list[str]:
    compiled = re.compile(r"(?:.*\.)?" + pattern)
    return [n for n in names if compiled.fullmatch(n)]


def _in_every_layer(names: list[str], layers: list[str], pattern: str) -> bool:
    found = _matches(names, pattern)
    return all(any(m.startswith(layer + ".") for m in found) for layer in layers)


def _norms_named(norms: list[str], layers: list[str], pattern: str) -> bool:
    """Whether `pattern` names every norm on the residual stream inside the layers (per-head q/k norms aside)."""
    inside = [n for n in norms if any(n.startswith(layer + ".") for layer in layers)]
    inside = [n for n in inside if not re.search(r"(?:^|\.)[qk]_(?:norm|layernorm)$", n)]
    return bool(inside) and len(_matches(inside, pattern)) == len(inside)


def _inferred(names: list[str], norms: list[str]) -> tuple[str, dict[str, str]] | None:
    """The first table that names each core role in every layer (Llama's FFN input is two: gate and up), with
    its aliases but `attn`/`xattn`, and but `ln` where that misses a norm inside the layers. Apertus calls its
    norms `attention_layernorm` (Llama's `ln` would have reached the final norm alone), XLM-R XL adds
    `self_attn_layer_norm` to BERT's (one of its two norms per layer), each without a word."""
    for canon in CANDIDATES:
        table = ALIASES[canon]
        layers = _matches(names, table["layer"])
        if layers and all(_in_every_layer(names, layers, table[a]) for a in CORE[:-1]):
            keep = {a: p for a, p in table.items() if a not in NOT_INFERRED}
            if not _norms_named(norms, layers, table["ln"]):
                del keep["ln"]
            return canon, keep
    return None


def _found(model: nn.Module) -> tuple[str, dict[str, str]] | None:
    modules = list(model.named_modules())
    key = (type(model), hash(tuple(n for n, _ in modules)))
    if key not in _seen:
        norms = [n for n, m in modules if "norm" in type(m).__name__.lower()]
        _seen[key] = _inferred([n for n, _ in modules], norms)
    return _seen[key]


def follows(model: nn.Module) -> str | None:
    """The model type whose table names each of `model`'s core roles in every layer, or None."""
    found = _found(model)
    return found[0] if found else None


def inferred_table(model: nn.Module, model_type: str) -> dict[str, str] | None:
    """The aliases of the table `model`'s names follow, without `attn`/`xattn`; warns which table, once."""
    found = _found(model)
    if found is None:
        return None
    canon, table = found
    if model_type not in _warned:
        _warned.add(model_type)
        unread = "" if "ln" in table else f", nor 'ln' ({canon}'s norm names miss norms in its layers)"
        warnings.warn(
            f"model type {model_type!r} is not in deltatune's alias tables; its module names follow {canon}'s, "
            f"whose aliases (attn.q, ffn.out, ...) are used for it; 'attn' is not (prefix tuning needs a mapped "
            f"attention){unread}",
            UserWarning,
            stacklevel=4,
        )
    return table
