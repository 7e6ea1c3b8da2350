"""GPT-NeoX (Pythia): its `query_key_value` interleaves q, k, v head by head, so `attn.q`/`attn.k`/`attn.v` name
the whole fused layer (as GPT-2's `c_attn`, and PEFT's default targets). Everything is mapped and held to what tests/modern.py's
table checks: identity at init, merge == unmerged, save/load, prefix tuning against a prefilled KV cache and
generate() against greedy decoding without one (rotary on a quarter of each head, as Pythia's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from modern import NUM_LABELS, VOCAB, greedy, keeps_promises, logits, make_inputs
from tiny import perturbed
from transformers import DynamicCache

import deltatune as dt
from deltatune.core import compat
from deltatune.core.targeting import resolve

N = 3  # prefix keys and values per attention
# what the methods take here: their defaults, LoRA also on the output projection
METHODS = {
    "lora": {"targets": ("attn.q", "attn.v", "attn.o")},
    "oft": {},
    "ia3": {},
    "adapter": {},
    "parallel_adapter": {},
    "prefix": {"num_tokens": N},
    "prompt": {"num_tokens": 4},
    "bitfit": {},
    "layernorm": {},
    "compacter": {},
}


def _model(head: str = "lm", seed: int = 0) -> torch.nn.Module:
    config = tf.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rotary_pct=0.25,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        num_labels=NUM_LABELS,
    )
    torch.manual_seed(seed)
    auto = tf.AutoModelForCausalLM if head == "lm" else tf.AutoModelForSequenceClassification
    return auto.from_config(config).eval()


def test_aliases_name_the_roles_and_the_fused_projection() -> None:
    model = _model()
    layer0 = "gpt_neox.layers.0."
    for alias, tail in (("attn", "attention"), ("attn.o", "attention.dense"), ("ffn.in", "mlp.dense_h_to_4h")):
        assert [n for n in resolve(model, alias) if n.startswith(layer0)] == [layer0 + tail], alias
    assert resolve(model, "ln") == [
        *(f"gpt_neox.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")),
        "gpt_neox.final_layer_norm",
    ]
    fused = [f"gpt_neox.layers.{i}.attention.query_key_value" for i in (0, 1)]
    for alias in ("attn.q", "attn.k", "attn.v"):
        assert resolve(model, alias) == fused, alias
    dm = dt.attach(model, "lora")  # LoRA's defaults learn here: one update per fused layer (q and v name it once)
    trained = {n: p.numel() for n, p in dm.named_parameters() if p.requires_grad}
    r = dm.deltas["default"].config.r
    assert sum(trained.values()) == 2 * r * (32 + 96)  # A (r x 32) and B (96 x r) per layer, nothing else
    assert all("query_key_value" in n for n in trained)


@pytest.mark.parametrize("head", ["lm", "cls"])
@pytest.mark.parametrize("method", METHODS)
def test_methods_keep_their_promises(head: str, method: str, tmp_path: Path) -> None:
    keeps_promises(method, head, lambda: _model(head), tmp_path, **METHODS[method])


def test_prefix_equals_a_kv_cache_prefilled_with_the_prefix() -> None:
    """The width comes from the config (4 heads of 8), not from a projection: a wrong one fails in the cache."""
    model = _model()
    inputs = {k: v for k, v in make_inputs(model).items() if k != "labels"}
    dm = dt.attach(model, "prefix", num_tokens=N, reparameterize=False)
    delta = dm.delta()
    assert [s.width for s in delta._sites] == [32, 32]
    with torch.no_grad():
        ours = dm(**inputs).logits
        dm.disable("default")
        cache, batch = DynamicCache(config=model.config), len(inputs["input_ids"])
        for i, site in enumerate(delta._sites):
            kv = delta.prefix(site).view(2, N, 4, 8).transpose(1, 2)
            cache.update(kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1), i)
        mask = torch.cat([torch.ones(batch, N, dtype=torch.long), inputs["attention_mask"]], dim=1)
        positions = torch.arange(inputs["input_ids"].shape[1]).expand(batch, -1)
        reference = dm(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            **{compat.cache_keyword(dm.backbone): cache},  # `cache` since 5.24, past_key_values before
        ).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_equals_greedy_decoding_without_a_cache(method: str) -> None:
    dm = perturbed(dt.attach(_model(), method, **METHODS[method]), scale=0.5)
    dm.backbone.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(out, greedy(dm, ids, 8))
    prompted = logits(dm, {"input_ids": out})
    dm.disable("default")
    assert (logits(dm, {"input_ids": out}) - prompted).abs().max() > 1e-2, "the delta changes nothing"
