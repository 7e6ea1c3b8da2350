"""Prefix and prompt tuning on the 2026 architectures (tests/modern.py): the attention a prefix defines,
checked against a prefilled KV cache and against attention computed by hand where the model is unusual:
a fused grouped-query projection (Phi-3), sliding windows (Mistral), an encoder with a fused q|k|v,
rotary positions inside the attention and no KV cache (ModernBERT, on the placeholder-row route), relative
position biases without a KV cache (DeBERTa, MPNet).
"""

from __future__ import annotations

import os

import pytest
import torch
from modern import (
    ARCHS,
    CAUSAL,
    MAIN,
    NO_CACHE,
    SLIDING,
    heads,
    logits,
    make_inputs,
    make_model,
    prefilled_cache,
)
from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

import deltatune as dt
from deltatune.core import compat, compat_config
from deltatune.core.targeting import resolve

N = 3  # prefix keys and values per attention
FULL = tuple(a for a in CAUSAL if a not in SLIDING)  # no sliding-window layer


def _ids(case: tuple) -> str:
    return "-".join(case)


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in make_inputs(model).items() if k != "labels"}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _attend(q, k, v, allowed: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """softmax(q k^T / sqrt(d)) v over (batch, heads, seq, dim), keys repeated for grouped-query heads."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("arch", ARCHS)
def test_detected_cache_keywords_are_the_known_ones(arch: str) -> None:
    """The canary of tests/test_compat.py on these models: ModernBERT's, DeBERTa's, MPNet's and ESM's attention take
    no cache; BERT's names on other encoders (ERNIE, XLM-R XL, ...) take one, as BERT's."""
    model = make_model(arch, heads(arch)[0])
    found = {compat.cache_keyword(model.get_submodule(name)) for name in resolve(model, "attn")}
    assert len(found) == 1 and (found == {None}) == (arch in NO_CACHE), found
    assert found <= {None, *compat.CACHE_KEYWORDS}, (
        f"add {found} to compat.CACHE_KEYWORDS and the table in core/compat.py"
    )


@pytest.mark.parametrize("arch", FULL)
def test_prefix_equals_a_kv_cache_prefilled_with_the_prefix(arch: str) -> None:
    """Phi-3 reads its key width off a fused qkv_proj with 2 key/value heads: thirds gave 21 columns.
    OPT has as many key/value heads as query heads (4 of 8)."""
    model = make_model(arch, "lm")
    inputs = _inputs(model)
    dm = dt.attach(model, "prefix", num_tokens=N, reparameterize=False)
    delta = dm.delta()
    kv_heads = compat_config.attention_heads(model)[1]
    assert [s.width for s in delta._sites] == [kv_heads * 8] * 2  # 2 key/value heads of 8 (OPT: 4)
    with torch.no_grad():
        ours = dm(**inputs).logits
        dm.disable("default")
        batch = len(inputs["input_ids"])
        cache = prefilled_cache(delta, model.config, kv_heads, batch)
        mask = torch.cat([torch.ones(batch, N, dtype=torch.long), inputs["attention_mask"]], dim=1)
        positions = torch.arange(inputs["input_ids"].shape[1]).expand(batch, -1)  # "keep": the backbone's own
        reference = dm(
            input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions, **{_cache_arg(dm): cache}
        ).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=0, atol=1e-5)


def _cache_arg(dm: dt.DeltaModel) -> str:
    return compat.cache_keyword(dm.backbone)


def test_prefix_in_a_sliding_window_is_seen_by_every_token_as_computed_by_hand() -> None:
    """Mistral windows every layer (4 tokens here). The prefix is not a token of the sequence: every query
    attends it, however far it is from the start (a prefix prefilled into a cache would slide out)."""
    model = make_model("mistral", "lm")
    inputs = _inputs(model)
    attn = model.model.layers[0].self_attn
    seen: dict = {}
    attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=(a or (kw["hidden_states"],))[0], kw=kw), with_kwargs=True
    )
    dm = dt.attach(model, "prefix", num_tokens=N, reparameterize=False)
    attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    logits(dm, inputs)
    h, (cos, sin) = seen["h"], seen["kw"]["position_embeddings"]
    batch, seq, _ = h.shape
    pk, pv = dm.delta().prefix(dm.delta()._sites[0]).detach().view(2, 1, N, 2, 8).transpose(2, 3)
    with torch.no_grad():
        split = lambda x, heads: x.view(batch, seq, heads, 8).transpose(1, 2)  # noqa: E731
        q = _rotate(split(attn.q_proj(h), 4), cos[:, None], sin[:, None])
        k = torch.cat([pk.expand(batch, -1, -1, -1), _rotate(split(attn.k_proj(h), 2), cos[:, None], sin[:, None])], 2)
        v = torch.cat([pv.expand(batch, -1, -1, -1), split(attn.v_proj(h), 2)], 2)
        i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        window = (j <= i) & (j > i - 4)
        real = window[None] & inputs["attention_mask"].bool()[:, None, :]
        allowed = torch.cat([torch.ones(batch, seq, N, dtype=torch.bool), real], dim=-1)[:, None]
        expected = attn.o_proj(_attend(q, k, v, allowed))
    rows = inputs["attention_mask"].bool()
    torch.testing.assert_close(seen["out"][rows], expected[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_modernbert_prefix_attention_matches_a_hand_computed_attention(layer: int) -> None:
    """No KV cache, so placeholder rows carry the prefix: their key and value columns of the fused Wqkv are
    overwritten, their rotary positions leave them unrotated. Layer 0 is global, layer 1 sees 2 tokens
    either side."""
    model = make_model("modernbert", "cls")
    inputs = _inputs(model)
    attn = model.model.layers[layer].attn
    seen: dict = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=(a or (kw["hidden_states"],))[0]), with_kwargs=True)
    dm = dt.attach(model, "prefix", num_tokens=N, reparameterize=False)
    attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    logits(dm, inputs)
    h = seen["h"]
    batch, seq, _ = h.shape
    site = next(s for s in dm.delta()._sites if s.name == f"model.layers.{layer}.attn")
    pk, pv = dm.delta().prefix(site).detach().view(2, 1, N, 4, 8).transpose(2, 3)
    theta = 160000.0 if layer == 0 else 10000.0  # ModernBERT's global and local rotary bases
    freqs = torch.arange(seq)[:, None] / theta ** (torch.arange(0, 8, 2) / 8)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    with torch.no_grad():
        q, k, v = attn.Wqkv(h).view(batch, seq, 3, 4, 8).transpose(1, 3).unbind(2)  # (batch, heads, seq, 8)
        k = torch.cat([pk.expand(batch, -1, -1, -1), _rotate(k, cos, sin)], 2)
        v = torch.cat([pv.expand(batch, -1, -1, -1), v], 2)
        i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        near = (i - j).abs() <= 2 if layer == 1 else torch.ones(seq, seq, dtype=torch.bool)
        real = near[None] & inputs["attention_mask"].bool()[:, None, :]
        allowed = torch.cat([torch.ones(batch, seq, N, dtype=torch.bool), real], dim=-1)[:, None]
        expected = attn.Wo(_attend(_rotate(q, cos, sin), k, v, allowed))
    rows = inputs["attention_mask"].bool()
    torch.testing.assert_close(seen["out"][rows], expected[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_deberta_prefix_attention_matches_one_computed_beside_the_hooks(layer: int) -> None:
    """No KV cache: placeholder rows carry the prefix, just before the first token, so its keys get
    relative positions -1..-3 from it (as T5's). The reference builds q, k, v itself and asks the attention's
    own disentangled bias for those positions: the rows, the rebuilt relative positions, the 0/1 mask with
    attended columns in front, and key_proj's second call (on the position embeddings) left as it was."""
    model = make_model("deberta-v2", "cls")
    # 24 tokens: distances of 11 and more reach the far buckets, whose position keys come first in key_proj's
    # output, where the prefix rows are written (at the default 10 no query used them)
    inputs = {k: v for k, v in make_inputs(model, seq=24).items() if k != "labels"}
    attn = model.deberta.encoder.layer[layer].attention.self
    seen: dict = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(a=a, kw=kw), with_kwargs=True)
    dm = dt.attach(model, "prefix", num_tokens=N, reparameterize=False)
    attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    logits(dm, inputs)
    h, mask = seen["a"][:2] if len(seen["a"]) > 1 else (seen["a"][0], seen["kw"]["attention_mask"])
    rel_embeddings = seen["kw"]["rel_embeddings"]
    batch, seq, _ = h.shape
    site = next(s for s in dm.delta()._sites if s.name.endswith(f"layer.{layer}.attention.self"))
    pk, pv = dm.delta().prefix(site).detach().view(2, 1, N, 4, 8).transpose(2, 3).flatten(0, 1)  # (4 heads, N, 8)
    with torch.no_grad():
        split = lambda x: x.view(batch, -1, 4, 8).transpose(1, 2).flatten(0, 1)  # noqa: E731  (batch*heads, n, 8)
        q = torch.cat([h.new_zeros(batch * 4, N, 8), split(attn.query_proj(h))], 1)  # placeholder queries unused
        k = torch.cat([pk.repeat(batch, 1, 1), split(attn.key_proj(h))], 1)
        v = torch.cat([pv.repeat(batch, 1, 1), split(attn.value_proj(h))], 1)
        positions = build_relative_position(
            q, k, bucket_size=attn.position_buckets, max_position=attn.max_relative_positions
        )
        bias = attn.disentangled_attention_bias(q, k, positions, rel_embeddings, 3)  # c2p, p2c: scale 1/sqrt(3*8)
        scores = (q @ k.transpose(-1, -2) / (3 * 8) ** 0.5 + bias)[:, N:].view(batch, 4, seq, N + seq)
        allowed = torch.cat([torch.ones(batch, 1, seq, N, dtype=torch.bool), mask.bool()], dim=-1)
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
        expected = (probs @ v[:, None].view(batch, 4, N + seq, 8)).transpose(1, 2).flatten(2)
    rows = inputs["attention_mask"].bool()
    torch.testing.assert_close(seen["out"][rows], expected[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("seq", [10, 40])
def test_mpnet_prefix_attention_matches_a_hand_computed_attention(seq: int) -> None:
    """No KV cache: placeholder rows carry the prefix, just before the first token. MPNet's encoder builds the
    relative position bias once for the real length and every attention adds it; rebuilt for N + seq, real
    tokens keep their bias among themselves and the prefix's keys get distances -1..-N from the first token.
    At 40 tokens distances pass 8 and reach the log buckets. (It failed on a size before: 13 keys, a 10 x 10 bias.)"""
    model = make_model("mpnet", "cls")
    inputs = {k: v for k, v in make_inputs(model, seq=seq).items() if k != "labels"}
    attn = model.mpnet.encoder.layer[1].attention.attn
    seen: dict = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0]), with_kwargs=True)
    dm = dt.attach(model, "prefix", num_tokens=N, reparameterize=False)
    attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    logits(dm, inputs)
    h = seen["h"]  # registered before the prefix's hooks: without its rows, as the output hook after them
    batch = len(h)
    site = next(s for s in dm.delta()._sites if s.name == "mpnet.encoder.layer.1.attention.attn")
    pk, pv = dm.delta().prefix(site).detach().view(2, 1, N, 4, 8).transpose(2, 3)
    with torch.no_grad():
        split = lambda x: x.view(batch, seq, 4, 8).transpose(1, 2)  # noqa: E731
        k = torch.cat([pk.expand(batch, -1, -1, -1), split(attn.k(h))], 2)
        v = torch.cat([pv.expand(batch, -1, -1, -1), split(attn.v(h))], 2)
        scores = split(attn.q(h)) @ k.transpose(-1, -2) / 8**0.5
        position = torch.arange(N + seq)
        buckets = model.mpnet.encoder.relative_position_bucket(position[None, :] - position[N:, None])
        scores = scores + model.mpnet.encoder.relative_attention_bias(buckets).permute(2, 0, 1)
        allowed = torch.cat([torch.ones(batch, N, dtype=torch.bool), inputs["attention_mask"].bool()], -1)
        probs = scores.masked_fill(~allowed[:, None, None], torch.finfo(scores.dtype).min).softmax(-1)
        expected = attn.o((probs @ v).transpose(1, 2).flatten(2))
    rows = inputs["attention_mask"].bool()
    torch.testing.assert_close(seen["out"][rows], expected[rows], rtol=0, atol=1e-5)


def test_deberta_prefix_without_a_mask_equals_one_with_a_mask_of_ones() -> None:
    """Given no mask DeBERTa makes a float one of 1s (1 = attend): the prefix's columns in front must be 1s,
    not the 0s an additive mask would take (they hid the prefix)."""
    dm = dt.attach(make_model("deberta-v2", "cls"), "prefix", num_tokens=N)
    ids = make_inputs(dm.backbone)["input_ids"]
    unmasked = logits(dm, {"input_ids": ids})
    torch.testing.assert_close(unmasked, logits(dm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    dm.disable("default")
    assert (logits(dm, {"input_ids": ids}) - unmasked).abs().max() > 1e-4, "the prefix changes nothing"


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_padded_row_classifies_as_it_does_alone(arch: str, method: str) -> None:
    model = make_model(arch, "cls")
    inputs = _inputs(model)
    dm = dt.attach(model, method, num_tokens=4)
    batched = logits(dm, inputs)
    n = int(inputs["attention_mask"][1].sum())
    alone = logits(dm, {"input_ids": inputs["input_ids"][1:, :n], "attention_mask": inputs["attention_mask"][1:, :n]})
    torch.testing.assert_close(batched[1], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,head", MAIN, ids=map(_ids, MAIN))
def test_prefix_gives_the_same_output_under_eager_and_sdpa_attention(arch: str, head: str) -> None:
    """The two get different masks (additive, boolean or none, one per window size): each is extended."""
    outs = []
    for impl in ("sdpa", "eager"):
        model = make_model(arch, head)
        try:
            model.set_attn_implementation(impl)
        except ValueError as e:  # Gemma 2 soft-caps its scores, which sdpa cannot: eager only
            pytest.skip(f"{arch}: no {impl} here: {str(e)[:80]}")
        torch.manual_seed(0)
        outs.append(logits(dt.attach(model, "prefix", num_tokens=N), _inputs(model)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DELTATUNE_SLOW_TESTS"), reason="DELTATUNE_SLOW_TESTS=1 (inductor on CPU)")
def test_prefix_as_placeholder_rows_under_flex_attention_equals_sdpa() -> None:
    """ModernBERT's fused Wqkv takes the prefix as placeholder rows: flex attention's BlockMask gets the rows'
    queries and keys in front, its sliding windows and padding asked at the shifted positions."""
    outs = []
    for impl in ("sdpa", "flex_attention"):
        model = make_model("modernbert", "cls")
        try:
            model.set_attn_implementation(impl)
        except (ValueError, ImportError) as e:
            pytest.skip(f"no {impl} here: {str(e)[:80]}")
        torch.manual_seed(0)
        dm = dt.attach(model, "prefix", num_tokens=3)
        with torch.no_grad():
            for p in dm.delta().parameters():
                p.mul_(3)
        outs.append(logits(dm, _inputs(model)))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
