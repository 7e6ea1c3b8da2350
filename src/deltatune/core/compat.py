"""Everything deltatune knows about transformers' internals, in one module (and `compat_config.py` for
the config attributes architectures name their sizes by, and converted tokenizers).

Methods that reach past the public model call (prefix and prompt tuning) ask this module how the
installed transformers names things; they never inspect signatures or spell internal keywords
themselves. So an upstream rename is one edit here, and `tests/test_compat.py` names it.

Where it can, this module detects a capability (does this attention take a KV cache, under which
name?) instead of comparing version strings: a cache parameter is found by its `Cache` annotation
first and by the known names second, so a pure rename is survived, and the one test
`test_detected_cache_keywords_are_the_known_ones` says the table below needs a line.

What differs between the ends of the range deltatune admits (pyproject.toml; CI runs both). The
releases in between each have one or the other form, which the detection does not need to know:

| what                                   | 4.57.6                                  | 5.24.0, 5.25.0                  |
|----------------------------------------|-----------------------------------------|---------------------------------|
| attention's KV-cache keyword           | past_key_values (old name past_key_value) | cache                         |
| model call / output cache name         | past_key_values                         | cache (past_key_values deprecated, removal 5.40) |
| cache_position argument                | passed; T5 places its bias by it        | gone; T5 counts the cache       |
| DistilBERT attention inputs            | query, key, value; 2-D mask (eager)     | hidden_states; 4-D mask         |
| DistilBERT position_ids argument       | none (a max_position buffer, by length) | taken                           |
| get_encoder() on *ForSequenceClassif.  | missing; get_decoder() returns the model | present                        |
| RoBERTa position helper                | module function                         | static method                   |
| ModernBERT attention inputs            | position_ids (rotates inside), sliding_window_mask | position_embeddings (cos, sin); 5.25 run |
| Gemma3ForCausalLM.base_model           | itself (prefix "language_model" unset)  | the Gemma3TextModel; 5.25 run   |
| BERT token_type_ids buffer             | sliced by sequence length               | gathered by position            |
| Falcon (new layout) KV cache heads     | one per query head (groups copied)      | key/value heads                 |
| SmolLM2 GGUF tokenizer conversion      | eos = bos, no pad, bos added to inputs  | eos = pad = <|im_end|>, no bos  |
| tokenizer folders (save_pretrained)    | 4.x format                              | not readable by 4.x             |

Quirks every release shares: RoBERTa numbers positions from padding_idx + 1 and skips padding,
BART's encoder numbers its learned positions from the input's shape (it takes no position_ids).
The position and token-type rows a prompt needs are in `compat_prompt.py`, the key positions a prefix
needs in `compat_rows.py`, the config readings in `compat_config.py`.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from .targeting import held_model

VERSION = transformers.__version__
# Folders written by save_pretrained do not load across major releases (5.x writes tokenizer_class
# "TokenizersBackend", unknown to 4.x), so what deltatune converts once is kept per major release.
SAVED_FORMAT = f"transformers{VERSION.split('.')[0]}"
# every name a KV cache argument has had, newest first (see the table above)
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")  # the last: GPT-Neo's, unannotated
MASK_KEYWORDS = ("attention_mask", "mask")
ROW_MASKS = ("sliding_window_mask", "causal_attention_mask")  # beside attention_mask: ModernBERT 4.x, CLIP 4.x text


class UnsupportedError(ValueError):
    """A transformers model or release deltatune cannot serve exactly: never a silent difference."""


# Modules every row of a batch shares, found by their attribute name: T5's (and its kin's) relative position
# table is called with (queries, keys) buckets, whose first size a mixed batch read as rows.
SHARED_BY_ROWS = ("relative_attention_bias",)


def shared_by_rows(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SHARED_BY_ROWS


def unsupported(what: str) -> UnsupportedError:
    return UnsupportedError(
        f"{what} (transformers {VERSION}; deltatune is tested with the range in its pyproject.toml, "
        "see README 'Compatibility')"
    )


# -- call arguments ---------------------------------------------------------------------------------
def signature(fn_or_module: Any) -> inspect.Signature:
    """The forward's signature; transformers' decorators keep it (functools.wraps)."""
    fn = fn_or_module.forward if isinstance(fn_or_module, nn.Module) else fn_or_module
    return inspect.signature(fn)


class CallArgs:
    """A module call's arguments by parameter name, however they were passed (positionally or by keyword)."""

    def __init__(self, sig: inspect.Signature, args: tuple, kwargs: dict) -> None:
        self.sig = sig
        self.bound = sig.bind_partial(*args, **kwargs)
        self.n_args = len(args)
        self.varkw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def accepts(self, name: str) -> bool:
        p = self.sig.parameters.get(name)
        return p is not None and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)

    def get(self, name: str) -> Any:
        if self.accepts(name):
            return self.bound.arguments.get(name)
        return self.bound.arguments.get(self.varkw, {}).get(name) if self.varkw else None

    def first(self) -> Any:
        return self.bound.arguments.get(next(iter(self.sig.parameters)))

    def set(self, name: str, value: Any) -> None:
        if self.accepts(name):
            self.bound.arguments[name] = value
        elif self.varkw:
            self.bound.arguments[self.varkw] = {**self.bound.arguments.get(self.varkw, {}), name: value}
        else:
            raise TypeError(f"cannot pass {name!r} to a forward that does not take it")

    def result(self) -> tuple[tuple, dict]:
        """As many positional arguments as came in (decorators such as transformers' read some by position)."""
        names = [p.name for p in self.sig.parameters.values() if p.kind is not p.VAR_POSITIONAL][: self.n_args]
        args = tuple(self.bound.arguments[n] for n in names)
        kwargs = {n: v for n, v in self.bound.arguments.items() if n not in names and n != self.varkw}
        kwargs.update(self.bound.arguments.get(self.varkw, {}) if self.varkw else {})
        return args, kwargs


# -- the KV cache -----------------------------------------------------------------------------------
def _is_cache_annotation(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):  # postponed annotations: "Cache | None", "Optional[Cache]"
        return "Cache" in annotation
    if isinstance(annotation, type):
        return issubclass(annotation, Cache)
    return any(_is_cache_annotation(a) for a in typing.get_args(annotation))


def cache_keyword(fn_or_module: Any) -> str | None:
    """Under which name this forward takes a KV cache object, or None when it takes none.

    A parameter annotated `Cache` wins (survives a rename); else the first known name it has.
    """
    params = [p for p in signature(fn_or_module).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for p in params:
        if _is_cache_annotation(p.annotation):
            return p.name
    names = {p.name for p in params}
    return next((n for n in CACHE_KEYWORDS if n in names), None)


def mask_keyword(fn_or_module: Any) -> str:
    """The name of an attention's mask argument ("mask" in T5 and DistilBERT 4.x)."""
    params = signature(fn_or_module).parameters
    return next((n for n in MASK_KEYWORDS if n in params), MASK_KEYWORDS[0])


def hidden_inputs(fn_or_module: Any) -> tuple[str, ...]:
    """The arguments of an attention that carry the hidden states (DistilBERT 4.x: query, key and value)."""
    params = list(signature(fn_or_module).parameters)
    if params[:3] == ["query", "key", "value"]:
        return tuple(params[:3])
    return (params[0],)


def call_cache(call: CallArgs, keyword: str | None = None) -> Any:
    """The cache a call carries: under the forward's own `keyword` (as `cache_keyword` found it) or any
    name the caller used (upstream keeps accepting old names for a while)."""
    for name in (keyword, *CACHE_KEYWORDS) if keyword else CACHE_KEYWORDS:
        value = call.get(name)
        if value is not None:
            return value
    return None


def output_cache(output: Any) -> Cache | None:
    """The cache a model output carries (`cache` or `past_key_values`, by type: no deprecated attribute read)."""
    if isinstance(output, dict):
        return next((v for v in output.values() if isinstance(v, Cache)), None)
    return None


def self_attention_cache(cache: Any) -> Any:
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def is_causal(attention: nn.Module) -> bool:
    """Whether an attention masks the future (and may rely on sdpa's is_causal when given no mask).

    T5's decoder attentions say so only through `is_decoder` (their is_causal is None in 4.57).
    """
    return bool(getattr(attention, "is_causal", False) or getattr(attention, "is_decoder", False))


class PrefixedCache:
    """What one attention call sees as its KV cache: the real cache (or none) with fixed keys/values in front.

    It speaks the `Cache` protocol attention modules use (`update`, `get_seq_length`, and the
    `EncoderDecoderCache` views T5/BART consult); everything else goes to the real cache. The real
    cache only ever stores real tokens.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, inner: Any, copies: int = 1) -> None:
        self.key, self.value, self.inner = key, value, inner
        self.copies = copies  # of each key/value head in the cache (compat_rows.cached_copies: Falcon 4.57)
        self.is_updated: dict[int, bool] = {}  # cross-attentions consult it: never "already cached"

    @property
    def self_attention_cache(self) -> PrefixedCache:
        return self

    @property
    def cross_attention_cache(self) -> PrefixedCache:
        return self

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.inner is not None:
            args = tuple(self._unshifted(a) for a in args)
            kwargs = {k: self._unshifted(v) for k, v in kwargs.items()}
            keys, values = self.inner.update(keys, values, layer_idx, *args, **kwargs)
        batch, heads, _, head_dim = keys.shape
        n = self.key.shape[0]

        def heads_first(prefix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            prefix = prefix.to(like.dtype).view(n, heads // self.copies, head_dim).transpose(0, 1)
            return prefix.repeat_interleave(self.copies, dim=0).unsqueeze(0).expand(batch, -1, -1, -1)

        return (
            torch.cat([heads_first(self.key, keys), keys], dim=2),
            torch.cat([heads_first(self.value, values), values], dim=2),
        )

    def _unshifted(self, cache_kwargs: Any) -> Any:
        """The real cache stores real tokens: it gets `cache_position` as generate() counted it (4.x)."""
        if isinstance(cache_kwargs, dict) and cache_kwargs.get("cache_position") is not None:
            return {**cache_kwargs, "cache_position": cache_kwargs["cache_position"] - self.key.shape[0]}
        return cache_kwargs

    def get_seq_length(self, layer_idx: int = 0) -> int:
        past = self.inner.get_seq_length(layer_idx) if self.inner is not None else 0
        return self.key.shape[0] + past

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def seq_length(cache: Any, attention: nn.Module | None = None) -> int:
    """How many tokens a cache holds (for this attention's layer, where layers differ: sliding windows)."""
    if cache is None:
        return 0
    # GPT-Neo calls it layer_id; without it layer 1 read layer 0's length, updated earlier in the same call
    layer_idx = next(
        (i for i in (getattr(attention, n, None) for n in ("layer_idx", "layer_id")) if isinstance(i, int)), 0
    )
    return int(cache.get_seq_length(layer_idx))


def shift_cache_position(call: CallArgs, n: int) -> None:
    """Count `n` keys in front of the real ones in an attention's `cache_position` (4.x; gone in 5.24).

    T5 4.x places its relative position bias by cache_position against key indices: with `n`
    prefix keys first, the real queries sit at n onwards, which puts the prefix just before the
    first token, as 5.x's cache-length count does. A `PrefixedCache` hands the real cache the
    unshifted value.
    """
    given = call.get("cache_position")
    if given is not None:
        call.set("cache_position", given + n)


def renumber_cache_position(call: CallArgs, past: int, length: int, device: torch.device) -> None:
    """Where a call carries `cache_position` (before 5.24), make it count the tokens really in the cache.

    A delta that puts extra tokens into the cache (a prompt) makes generate()'s own count wrong by
    that many; the model's masks are built from it. This is the value the model computes when none
    is given: the cache's length onwards.
    """
    if call.get("cache_position") is not None:
        call.set("cache_position", torch.arange(past, past + length, device=device))


# -- stacks, positions, token types ---------------------------------------------------------------
def _stack(model: nn.Module, which: str) -> nn.Module:
    """A model's encoder or decoder stack. 4.57's *ForSequenceClassification lack get_encoder, and the
    generic get_decoder() there returns the model itself: ask the base model too, and never accept self."""
    for owner in (model, getattr(model, "base_model", None)):
        get = getattr(owner, f"get_{which}", None)
        found = get() if get is not None else None
        if isinstance(found, nn.Module) and found is not owner and found is not model:
            return found
    raise unsupported(f"cannot find the {which} of {type(model).__name__}")


def encoder(model: nn.Module) -> nn.Module:
    return _stack(model, "encoder")


def base_model(model: nn.Module) -> nn.Module:
    """The stack a task model wraps (`model.base_model`); a module holding one transformers model (a
    SentenceTransformer), that one's. 4.57's Gemma3ForCausalLM holds its stack as `model` but names its prefix
    "language_model", so `base_model` was the whole model (prompt tuning failed on a KeyError): a model that is its
    own base but wraps one pretrained model gives that one. OPTForCausalLM (and BartForCausalLM) call their base
    model's `decoder` past its forward (a prompt there changed nothing): a base holding only a decoder gives it."""
    if (held := held_model(model)) is not None:
        return base_model(held[1])
    base = getattr(model, "base_model", model)
    inner = [c for c in model.children() if isinstance(c, transformers.PreTrainedModel)] if base is model else []
    if len(inner) == 1:
        return inner[0]
    stack = getattr(base, "decoder", None)
    if isinstance(stack, transformers.PreTrainedModel) and getattr(base, "encoder", None) is None:
        return stack
    return base


def input_embeddings(stack: nn.Module) -> nn.Module | None:
    """What embeds a stack's input; None where it names none (CLIPModel's two towers raise NotImplementedError,
    4.57's CLIPTextTransformer is no PreTrainedModel)."""
    try:
        return stack.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def token_embeddings(stack: nn.Module) -> nn.Embedding | None:
    """A stack's token embedding table; None also where its inputs are no tokens (ViT, Whisper's encoder)."""
    embed = input_embeddings(stack)
    return embed if isinstance(embed, nn.Embedding) else None


def decoder(model: nn.Module) -> nn.Module:
    return _stack(model, "decoder")
