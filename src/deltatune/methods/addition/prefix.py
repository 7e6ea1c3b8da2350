"""Prefix tuning (Li & Liang 2021): `num_tokens` trainable key and value vectors in front of every attention's own.

How the prefix gets in: a pre-hook on each attention module hands it, as its KV cache argument
(named as `core.compat.cache_keyword` finds it: `past_key_values` before 5.24, `cache` since), a
stand-in cache whose `update(k, v)` returns the prefix concatenated in front of the keys and
values (after passing them to the model's real cache, if there is one). Every attention calls
`update` right before attending, after rotary embeddings, so prefix keys are never rotated and a
grouped-query model gets prefixes with its `num_key_value_heads` heads. The real cache only ever
stores real tokens: positions, the masks the model builds and `generate()` bookkeeping are those of
the backbone, and the prefix is attended at every step without being cached. The same pre-hook
prepends `num_tokens` "attend" columns to the 4-D mask (True for boolean masks, 0 for additive
ones) and writes out the causal mask where the model passed none and relied on sdpa's `is_causal`,
which would misalign once keys outnumber queries. T5 asks that cache for its length to place its
relative position bias: it hears real length + num_tokens, which puts the prefix just before the
first token.

Why not the public route (a `DynamicCache` prefilled with the prefixes, passed at the model call):
for a forward it gives the same numbers (`test_prefix_equals_a_kv_cache_prefilled_with_the_prefix`
holds this route to it), but `generate()` takes a non-empty cache to mean "these input tokens are
already processed", so prefilling needs overriding generation internals that change every few
releases (PEFT's prepare_inputs_for_generation fixes), and it shifts real positions by num_tokens.
The per-attention cache argument is the narrower contract: one keyword, found by capability.

Attention modules without a cache argument (DistilBERT, ModernBERT) get the prefix another way: the
pre-hook prepends `num_tokens` placeholder rows to the hidden states (and to the rotary positions,
unrotated: `compat_rows.rows_in_front`; MPNet's relative position bias rebuilt for the longer sequence), output hooks on the key and value projections overwrite those
rows with the prefix (their key or value columns, in a fused q|k|v projection), and an output hook
drops the rows again.

Positions (`positions`): "keep" (the default) leaves the real tokens at the positions the model
gives them, which the public route above does not. "shift" reproduces that route (PEFT's): a
pre-hook on the model's stack moves every real position up by num_tokens, as a cache already
holding num_tokens tokens would, on stacks that take position_ids (absolute and rotary positions;
relative ones, T5, have no such argument and need nothing). Saved with the delta: a prefix trained
one way computes another function the other way. PEFT prefixes import as "shift".

Reparameterization (the paper's, for stable training): prefix = MLP(embedding), with
embedding (num_tokens, d) -> Linear(d, mid_dim) -> tanh -> Linear(mid_dim, sum of 2*kv width).
Each layer computes only its slice of the last Linear. `drop_reparameterization()` stores the
prefixes themselves after training, so the saved delta is just the key/value numbers.
Not mergeable: extra keys change the softmax's normalization, which no weight change expresses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core import compat, compat_config, compat_prompt, compat_rows
from ...core.aliases import INTERLEAVED
from ...core.compat import CallArgs
from ...core.delta import Delta, DeltaConfig, Hooks, safe_key, setting
from ...core.layers import delta_dtype, linear_dims
from ...core.targeting import TargetError, model_type, resolve
from ._masks import extend_mask

POSITIONS = ("keep", "shift")  # real tokens keep their positions, or come after the prefix (PEFT's numbering)


@dataclasses.dataclass
class PrefixConfig(DeltaConfig):
    method: ClassVar[str] = "prefix"
    family: ClassVar[str] = "addition"
    trains: ClassVar[str] = "num_tokens key/value prefix vectors per attention layer (via an MLP while training)"
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    static_cache: ClassVar[bool] = (
        False  # generate refuses a fixed-size KV cache: its keys and values are added to every attention layer's, beyond the cache's length (core.conventions)
    )
    peft_names: ClassVar[dict[str, str]] = {
        "num_virtual_tokens": "num_tokens",
        "encoder_hidden_size": "mid_dim",
        "prefix_projection": "reparameterize",
    }
    routable: ClassVar[bool] = False  # its prefixes live in the attention cache, shared by the batch
    default_lr: ClassVar[float] = 5e-4  # measured: 5e-5 stayed at chance, 5e-3 failed too (docs/study.md)

    num_tokens: int = setting(6, size=True)
    reparameterize: bool = True
    mid_dim: int = setting(512, size=True)
    cross_attention: bool = False  # also prefix the decoder's cross-attention of an encoder-decoder
    positions: str = "keep"  # "shift": real tokens numbered after the prefix, as PEFT does (module docstring)

    def build(self) -> Prefix:
        return Prefix(self)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        for field in ("num_tokens", "mid_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}.{field} must be a positive integer, got {value!r}")
        for field in ("reparameterize", "cross_attention"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{name}.{field} must be True or False, got {getattr(self, field)!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"{name}.positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")


class _Site:
    """One prefixed attention module: where its slice of the MLP output starts, and how it is fed."""

    def __init__(
        self, name: str, key: str, width: int, offset: int, cross: bool, module: nn.Module, columns: dict[str, slice]
    ) -> None:
        self.name, self.key, self.width, self.offset, self.cross = name, key, width, offset, cross
        self.columns = columns  # where keys ("k") and values ("v") lie in their projections' outputs (hidden route)
        self.signature = compat.signature(module)
        self.mask_arg = compat.mask_keyword(module)
        self.cache_arg = compat.cache_keyword(module)  # None: the attention takes no cache (hidden route)
        self.limit: int | None = None  # keys its fixed causal buffer lets every query see (GPT-Neo)
        self.copies = 1  # of each key/value head its cache holds (Falcon 4.57: one per query head)
        self.alibi = None  # (builder, query heads) of the ALiBi biases the prefix's keys need too (BLOOM)
        self.hidden_args = compat.hidden_inputs(module)
        self.current: torch.Tensor | None = None  # the (2, n, width) prefix of the call in flight (hidden route)
        self.pending: set[int] = set()  # keys (0), values (1) not yet written into the call's placeholder rows
        self.bias = None  # what rebuilds a position_bias argument for the rows too (hidden route, MPNet)


class Prefix(Delta):
    config: PrefixConfig

    def __init__(self, config: PrefixConfig) -> None:
        super().__init__(config)
        self._sites: list[_Site] = []

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        try:
            chosen = [(n, False) for n in resolve(model, "attn")]
        except TargetError as err:  # "target modules by name" is no advice here: prefix tuning takes no targets
            raise ValueError(
                f"prefix tuning hooks attention modules deltatune has checked, and those of model type "
                f"{model_type(model)!r} are not among them ({str(err).split('; target modules')[0]}); prompt tuning "
                "or another method works there"
            ) from err
        if cfg.cross_attention:
            try:
                chosen += [(n, True) for n in resolve(model, "xattn")]
            except TargetError as err:
                raise ValueError(
                    f"PrefixConfig.cross_attention=True but {type(model).__name__} has no cross-attention; "
                    "set cross_attention=False"
                ) from err
        offset = 0
        for name, cross in chosen:
            module = model.get_submodule(name)
            width, columns = _kv_layout(model, name, cross)
            site = _Site(name, safe_key(name), width, offset, cross, module, columns)
            site.limit = compat_rows.keys_limit(module, model)
            site.copies = compat_rows.cached_copies(module)
            offset += 2 * width
            self._sites.append(site)
            if site.cache_arg is not None:
                build = compat_rows.alibi_builder(model, name)
                site.alibi = None if build is None else (build, compat_config.attention_heads(model)[0])
                hooks.on_input(module, self._cache_hook(site))
                continue
            if cross or compat.is_causal(module):  # placeholder rows would see, or be seen by, the wrong tokens
                raise compat.unsupported(
                    f"prefix tuning cannot reach the keys of {name!r} ({type(module).__name__}): its forward takes "
                    f"no KV cache (none of {', '.join(compat.CACHE_KEYWORDS)}, none annotated Cache)"
                )
            site.bias = compat_rows.position_bias_builder(model, name)
            k_proj, v_proj = (model.get_submodule(_projection(model, name, p, cross)) for p in ("k", "v"))
            hooks.on_input(module, self._rows_hook(site))
            hooks.on_output(k_proj, self._overwrite_hook(site, 0, site.columns["k"]))
            hooks.on_output(v_proj, self._overwrite_hook(site, 1, site.columns["v"]))
            hooks.on_output(module, self._drop_rows_hook(site))
        if cfg.positions == "shift":
            self._shift_positions(model, hooks)
        ref = model.get_submodule(chosen[0][0])
        dtype = delta_dtype(ref)  # a float dtype where the weights are stored as integers (bitsandbytes)
        n = cfg.num_tokens
        if cfg.reparameterize:
            embed = compat.token_embeddings(compat.base_model(model))  # none on ViT (patches) or CLIP (two towers)
            dim = embed.weight.shape[1] if embed is not None else compat_config.model_width(model)
            self.embedding = nn.Embedding(n, dim, dtype=dtype)
            self.mlp_in = nn.Linear(dim, cfg.mid_dim, dtype=dtype)
            self.mlp_out = nn.Linear(cfg.mid_dim, offset, dtype=dtype)
        else:
            self.prefixes = nn.ParameterDict(
                {s.key: nn.Parameter(torch.randn(2, n, s.width, dtype=dtype)) for s in self._sites}
            )
        self._count_sites()

    # -- the prefixes -----------------------------------------------------------------------------
    def prefix(self, site: _Site) -> torch.Tensor:
        """The (2, num_tokens, kv width) keys and values of one attention module."""
        if "prefixes" in self._modules:
            return self.prefixes[site.key]
        hidden = torch.tanh(self.mlp_in(self.embedding.weight))
        rows = slice(site.offset, site.offset + 2 * site.width)
        out = F.linear(hidden, self.mlp_out.weight[rows], self.mlp_out.bias[rows])
        return out.view(-1, 2, site.width).transpose(0, 1)

    @torch.no_grad()
    def drop_reparameterization(self) -> None:
        """Replace the MLP by the prefixes it computes now; outputs stay the same."""
        if "prefixes" in self._modules:
            return
        values = {s.key: nn.Parameter(self.prefix(s).detach().clone()) for s in self._sites}
        del self.embedding, self.mlp_in, self.mlp_out
        self.prefixes = nn.ParameterDict(values)
        self.finalized["reparameterize"] = False
        self._count_sites()

    def finalize(self) -> None:
        """At the end of training the MLP has done its job (stable optimization): keep only its output."""
        self.drop_reparameterization()

    def _count_sites(self) -> None:
        reparam = "prefixes" not in self._modules
        for i, s in enumerate(self._sites):
            own = (self.config.mid_dim + 1) * 2 * s.width if reparam else 2 * self.config.num_tokens * s.width
            shared = sum(p.numel() for m in (self.embedding, self.mlp_in) for p in m.parameters()) if reparam else 0
            self.sites[s.name] = own + (shared if i == 0 else 0)  # the shared MLP input side shown once

    # -- hooks ------------------------------------------------------------------------------------
    def _shift_positions(self, model: nn.Module, hooks: Hooks) -> None:
        """Number real tokens from num_tokens on: each stack that takes position_ids gets them moved up."""
        n = self.config.num_tokens
        enc_dec = getattr(model.config, "is_encoder_decoder", False)
        stacks = [compat.encoder(model), compat.decoder(model)] if enc_dec else [compat.base_model(model)]
        for stack in stacks:
            sig = compat.signature(stack)
            if "position_ids" not in sig.parameters:
                continue  # relative positions (T5) or numbered by length: nothing to move
            cache_arg = compat.cache_keyword(stack)

            def hook(module: nn.Module, args: tuple, kwargs: dict, sig=sig, cache_arg=cache_arg) -> tuple[tuple, dict]:
                call = CallArgs(sig, args, kwargs)
                given = call.get("position_ids")
                if given is None:  # what the stack numbers itself: from the real cache's length on
                    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
                    past = compat.seq_length(compat.self_attention_cache(compat.call_cache(call, cache_arg)))
                    given = compat_prompt.real_positions(module, ids, embeds if ids is None else ids, None)[0] + past
                call.set("position_ids", given + n)
                return call.result()

            hooks.on_input(stack, hook)

    def _cache_hook(self, site: _Site):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            call = CallArgs(site.signature, args, kwargs)
            inner = None if site.cross else compat.self_attention_cache(call.get(site.cache_arg))
            kv = self.prefix(site)
            call.set(site.cache_arg, compat.PrefixedCache(kv[0], kv[1], inner, site.copies))
            if not site.cross:
                compat.shift_cache_position(call, kv.shape[1])
            hidden = call.first()
            past = compat.seq_length(inner, module)
            if site.limit is not None and past + hidden.shape[1] + kv.shape[1] > site.limit:
                raise compat.unsupported(
                    f"prefix tuning on {site.name!r} ({type(module).__name__}): its causal mask lets a query see "
                    f"{site.limit} keys back, so with {kv.shape[1]} prefix tokens in front every query sees the "
                    f"prefix only up to {max(site.limit - kv.shape[1], 0)} tokens; this call has {past + hidden.shape[1]}: "
                    "give shorter inputs (or fewer num_tokens)"
                )
            causal = not site.cross and compat.is_causal(module)
            mask = extend_mask(call.get(site.mask_arg), kv.shape[1], hidden, past, causal)
            call.set(site.mask_arg, mask)
            if site.alibi is not None:
                compat_rows.alibi_in_front(call, kv.shape[1], *site.alibi)
            return call.result()

        return hook

    def _rows_hook(self, site: _Site):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            call = CallArgs(site.signature, args, kwargs)
            hidden = call.first()
            site.current = self.prefix(site)
            site.pending = {0, 1}
            n = site.current.shape[1]
            for arg in site.hidden_args:  # DistilBERT 4.x passes the hidden states as query, key and value
                states = call.get(arg)
                call.set(arg, torch.cat([states.new_zeros(len(states), n, states.shape[-1]), states], 1))
            for name in (site.mask_arg, *compat.ROW_MASKS):
                mask = call.get(name)
                if mask is None:
                    continue
                mask = extend_mask(mask, n, hidden, 0, False, rows=True)
                if (
                    isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] > 1
                ):  # placeholder rows' queries attend anywhere: dropped
                    mask = torch.cat([mask[..., :1, :].expand(*mask.shape[:-2], n, -1), mask], dim=-2)
                call.set(name, mask)
            compat_rows.rows_in_front(call, n, site.bias)  # rotary positions stay unrotated; relative ones grow
            return call.result()

        return hook

    def _overwrite_hook(self, site: _Site, which: int, columns: slice):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            if site.current is None or which not in site.pending:  # DeBERTa's key_proj also projects its
                return output  # relative position embeddings, after the hidden states: those stay as they are
            site.pending.discard(which)
            prefix = site.current[which].to(output.dtype)
            n = prefix.shape[0]
            rows = output[:, :n]  # a fused projection's placeholder rows keep their other columns (queries)
            rows = torch.cat(
                [rows[..., : columns.start], prefix.expand(len(output), -1, -1), rows[..., columns.stop :]], dim=-1
            )
            return torch.cat([rows, output[:, n:]], dim=1)

        return hook

    def _drop_rows_hook(self, site: _Site):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            n = site.current.shape[1] if site.current is not None else 0
            site.current = None
            if isinstance(output, torch.Tensor):
                return output[:, n:]
            if len(output) == 1:
                return (output[0][:, n:],)
            weights = output[1][..., n:, :] if output[1] is not None else None
            return (output[0][:, n:], weights, *output[2:])

        return hook


def _projection(model: nn.Module, attn: str, which: str, cross: bool) -> str:
    alias = f"{'xattn' if cross else 'attn'}.{which}"
    found = [n for n in resolve(model, alias) if n.startswith(attn + ".")]
    if not found:
        raise ValueError(f"cannot find the {which} projection of attention {attn!r} (alias {alias!r})")
    return found[0]


def _kv_layout(model: nn.Module, attn: str, cross: bool) -> tuple[int, dict[str, slice]]:
    """Width of one attention's keys (heads x head size, num_key_value_heads for grouped-query attention)
    and where the keys and the values lie in the outputs of their projections.

    A fused projection (GPT-2's `c_attn`, Phi-3's `qkv_proj`, ModernBERT's `Wqkv`) lays out q|k|v one
    after the other (k|v in GPT-2's cross-attention): queries take heads x head size, keys and values
    key/value heads x head size each. Split by thirds, Phi-3 with grouped-query attention (4 query, 2
    key/value heads of 8: 64 columns) got 21-column prefixes and failed in a reshape."""
    interleaved = not cross and model_type(model) in INTERLEAVED
    try:
        names = {} if interleaved else {p: _projection(model, attn, p, cross) for p in ("q", "k", "v")}
    except TargetError:
        if cross:
            raise
        interleaved = True
    if interleaved:
        if compat.cache_keyword(model.get_submodule(attn)) is None:  # DeBERTa (v1): one in_proj, head by head
            raise compat.unsupported(
                f"prefix tuning cannot reach the keys of {attn!r} ({type(model.get_submodule(attn)).__name__}): it "
                "takes no KV cache, and no one layer computes its keys and values alone to write the prefix into"
            )
        return _width_from_config(model, attn), {}  # the cache route needs no columns
    columns = {}
    for which in ("k", "v"):
        _, out = linear_dims(model.get_submodule(names[which]))
        fused = [p for p in ("q", "k", "v") if names[p] == names[which]]
        heads, kv_heads = compat_config.attention_heads(model) or (1, 1)
        share = {"q": heads, "k": kv_heads, "v": kv_heads}
        if len(fused) == 1:
            columns[which] = slice(0, out)
            continue
        unit, rest = divmod(out, sum(share[p] for p in fused))
        if rest:
            raise compat.unsupported(
                f"prefix tuning cannot split {names[which]!r} ({out} outputs) into {'|'.join(fused)} for "
                f"{heads} query and {kv_heads} key/value heads"
            )
        start = sum(share[p] for p in fused[: fused.index(which)]) * unit
        columns[which] = slice(start, start + kv_heads * unit)
    return columns["k"].stop - columns["k"].start, columns


def _width_from_config(model: nn.Module, attn: str) -> int:
    """Key width from the config, for an attention whose fused projection is not split: GPT-NeoX
    interleaves q|k|v per head in `query_key_value` (`INTERLEAVED`), so no slice is its keys. On the cache route the
    prefix only needs the width; a wrong one fails loudly when the cache views it per head."""
    heads = compat_config.attention_heads(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None)
    width = compat_config.model_width(model)
    if heads is None or (not isinstance(head_dim, int) and width is None):
        raise compat.unsupported(f"prefix tuning cannot tell the key width of {attn!r} from the model's config")
    return heads[1] * (head_dim if isinstance(head_dim, int) else width // heads[0])
