"""Keys in front of an attention's own (a prefix): the position arguments that must grow with them.

Prefix tuning reaches an attention that takes no KV cache (DistilBERT, ModernBERT, DeBERTa, MPNet) by
prepending `num_tokens` placeholder rows to its hidden states, and one that takes a cache by handing it
keys and values in front of the real ones (methods/addition/prefix.py). Whatever the attention receives
per key position (rotary tables, relative position biases, BLOOM's ALiBi) then has to cover those keys
too, or it fails on a size (or worse, fits by broadcasting). Like `compat.py`, this module is where those
transformers internals are named.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .compat import CallArgs, unsupported

BIAS_BUILDER = "compute_position_bias"  # MPNet's encoder: (batch, heads, length, length) relative position bias


ALIBI_BUILDER = "build_alibi_tensor"  # BLOOM's model: (batch * heads, 1, keys) linear biases by key position


def _above(model: nn.Module, attention: str, method: str) -> Callable | None:
    """The method `method` of the nearest module above `attention` that has one; None where none has."""
    parts = attention.split(".")
    for i in range(len(parts) - 1, -1, -1):
        build = getattr(model.get_submodule(".".join(parts[:i])), method, None)
        if callable(build):
            return build
    return None


def position_bias_builder(model: nn.Module, attention: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What builds the `position_bias` an attention adds to its scores, for a longer sequence: MPNet's encoder
    computes it once per call for every layer, from the sequence length alone. None where nothing above does."""
    return _above(model, attention, BIAS_BUILDER)


def alibi_builder(model: nn.Module, attention: str) -> Callable | None:
    """What builds the ALiBi biases (BLOOM) an attention adds to its scores; None where nothing above does."""
    return _above(model, attention, ALIBI_BUILDER)


def alibi_in_front(call: CallArgs, n: int, build: Callable, heads: int) -> None:
    """Give `n` prefix keys in front of the cache's their ALiBi biases: BLOOM's `alibi` (batch * heads, 1, keys)
    is slope x key position, so the prefix is placed just before the first token, at -n..-1 (as T5's and
    MPNet's relative positions place it). A bias constant along a query's row cancels in the softmax, so this
    equals a cache prefilled with the prefix at positions 0..n-1 (PEFT's route). Without it BLOOM failed on
    a size (alibi of the real keys only)."""
    alibi = call.get("alibi")
    if not isinstance(alibi, torch.Tensor):
        return
    ones = torch.ones(alibi.shape[0] // heads, 2, dtype=torch.long, device=alibi.device)
    slopes = build(ones, heads, alibi.dtype)[:, 0, 1]  # the bias at position 1 is the slope
    before = slopes[:, None, None] * torch.arange(-n, 0, device=alibi.device, dtype=alibi.dtype)
    call.set("alibi", torch.cat([before.expand(-1, alibi.shape[1], -1), alibi], dim=-1))


def _causal_buffer(attention: nn.Module, model: nn.Module) -> torch.Tensor | None:
    """The fixed causal buffer (`bias`, 4-D bool) an attention masks by under eager attention: GPT-Neo's (a window
    on its local layers), GPT-2 4.57's. None elsewhere, and under sdpa or flash attention, which do not read it."""
    bias = getattr(attention, "bias", None)
    if getattr(model.config, "_attn_implementation", None) not in (None, "eager"):
        return None
    return bias if isinstance(bias, torch.Tensor) and bias.dtype == torch.bool and bias.dim() == 4 else None


def keys_limit(attention: nn.Module, model: nn.Module) -> int | None:
    """How many keys an attention with a fixed causal buffer can take with its first key still seen by every
    query: the window of GPT-Neo's local layers, the buffer's length (max positions) elsewhere. None without
    one. The buffer treats keys in front of the real ones (a prefix) as tokens: past the limit a prefix would
    slide out of a window, or not fit."""
    bias = _causal_buffer(attention, model)
    return None if bias is None else int(bias[0, 0, -1].sum())


def tokens_limit(stack: nn.Module, model: nn.Module) -> int | None:
    """How many tokens (a prompt's included) the fixed causal buffers inside `stack` cover; None without one.
    Past it GPT-Neo failed inside on a size ("The size of tensor a (2048) must match ...")."""
    sizes = [b.shape[-1] for m in stack.modules() if (b := _causal_buffer(m, model)) is not None]
    return min(sizes) if sizes else None


def cached_copies(attention: nn.Module) -> int:
    """How many copies of each key/value head an attention puts in its KV cache, so a prefix's heads are copied
    alike: Falcon's grouped layout at 4.57 copies each group's keys to its query heads before caching (5.x
    caches the groups; its attention has `num_key_value_groups`); 1 elsewhere."""
    if getattr(attention, "new_decoder_architecture", False) and not hasattr(attention, "num_key_value_groups"):
        return attention.num_heads // attention.num_kv_heads
    return 1


def rows_in_front(call: CallArgs, n: int, bias: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Give an attention that gets `n` placeholder rows in front of its hidden states (prefix tuning where it
    takes no cache) those rows in its position arguments too. Rotary ones stay unrotated, as the cache route
    leaves prefix keys: `position_embeddings` (cos, sin: ModernBERT 5.x) get cos 1 and sin 0, `position_ids`
    (ModernBERT 4.x rotates inside its attention) position 0. Relative ones put the rows just before the first
    token, as T5's cache does: DeBERTa's `relative_pos`, built for the real length, is dropped (it rebuilds it
    from its query and key lengths); MPNet's `position_bias` is rebuilt by `bias` (`position_bias_builder`) for
    the longer sequence, so real tokens keep their bias among themselves. Without this the rows did not fit."""
    rotary = call.get("position_embeddings")
    if isinstance(rotary, tuple) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary):
        cos, sin = rotary
        shape = (*cos.shape[:-2], n, cos.shape[-1])
        call.set(
            "position_embeddings",
            (torch.cat([cos.new_ones(shape), cos], -2), torch.cat([sin.new_zeros(shape), sin], -2)),
        )
    ids = call.get("position_ids")
    if isinstance(ids, torch.Tensor):
        call.set("position_ids", torch.cat([ids.new_zeros(*ids.shape[:-1], n), ids], dim=-1))
    if isinstance(call.get("relative_pos"), torch.Tensor):
        call.set("relative_pos", None)
    given = call.get("position_bias")
    if isinstance(given, torch.Tensor):
        if bias is None:
            raise unsupported("prefix tuning cannot extend this attention's position_bias: nothing above it builds one")
        rows = given.shape[-1] + n
        built = bias(given.new_empty(given.shape[0], rows, 0))
        if built.shape[-2:] != (rows, rows):
            raise unsupported(
                f"prefix tuning rebuilt a position_bias of shape {tuple(built.shape)}, not {rows} x {rows}"
            )
        call.set("position_bias", built)
