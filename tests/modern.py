"""Tiny random models of the architectures users fine-tune in 2026, for tests/test_arch_modern*.py.

A table of its own, apart from tiny.py's `_CONFIGS` (which other tests parametrize over). Each config
keeps what sets the architecture apart: grouped-query attention (4 query, 2 key/value heads of 8),
Phi-3's and ModernBERT's fused projections, sliding-window layers whose 4-token window is shorter than
the test sequences (Gemma 3, Mistral, Qwen2 and ModernBERT), per-head query/key norms (Qwen3, OLMo 2,
Gemma 3), SmolLM3's layer without rotary positions, Gemma 3's scaled embeddings and zero-centred norms.
Also the established families: Gemma and Gemma 2 (attention-score soft-capping, a sliding layer), Granite
(its embedding, attention, residual and logit multipliers), StarCoder2 (windowed, with biases), Phi-2
(attention and MLP in parallel, rotary on half of each head), OPT (learned positions, no grouped heads),
DeBERTa v3 (disentangled relative attention in log buckets, its key projection shared with positions) and MPNet
(a relative position bias the encoder builds once and every attention adds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import GQA

VOCAB = 100
NUM_LABELS = 3
V4 = tf.__version__.startswith("4.")
_GQA = GQA
_SLIDE_FULL = ["sliding_attention", "full_attention"]
_ENC = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=70, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    initializer_range=0.1,  # as MPNet's below: at 0.02 two prompts' pooled logits differed by ~1e-4
)  # fmt: skip
_CONFIGS = {
    "qwen3": lambda: tf.Qwen3Config(**_GQA, head_dim=8),
    # layer 0 full attention, layer 1 a 4-token sliding window
    "qwen2": lambda: tf.Qwen2Config(**_GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "gemma3_text": lambda: tf.Gemma3TextConfig(
        **_GQA, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
    "mistral": lambda: tf.MistralConfig(**_GQA, sliding_window=4),
    "phi3": lambda: tf.Phi3Config(**_GQA),  # qkv_proj holds 4 + 2 + 2 heads of 8: 64 outputs
    "smollm3": lambda: tf.SmolLM3Config(**_GQA, no_rope_layer_interval=2),  # layer 1 has no rotary positions
    "olmo2": lambda: tf.Olmo2Config(**_GQA),
    "gemma": lambda: tf.GemmaConfig(**_GQA, head_dim=8),
    # scores soft-capped at 50 (eager attention), logits at 30; layer 0 slides over 4 tokens
    "gemma2": lambda: tf.Gemma2Config(
        **_GQA, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
    # Granite 3's multipliers: scores scaled by 1/64 (not 1/sqrt(8)), residual branches by 0.22
    "granite": lambda: tf.GraniteConfig(
        **_GQA, embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=8.0
    ),
    "starcoder2": lambda: tf.Starcoder2Config(**_GQA, sliding_window=4),
    "phi": lambda: tf.PhiConfig(**_GQA, partial_rotary_factor=0.5),  # rotary on 4 of each head's 8 dimensions
    "opt": lambda: tf.OPTConfig(  # 4 heads of 8, keys and values as many
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # layer 0 global, layer 1 local: each token sees 2 tokens either side
    "modernbert": lambda: tf.ModernBertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        local_attention=4,
        global_attn_every_n_layers=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    ),
    # v3's settings: no absolute positions, relative ones in 8 log buckets, c2p and p2c sharing key_proj
    "deberta-v2": lambda: tf.DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        relative_attention=True,
        position_buckets=8,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        initializer_range=0.1,  # at 0.02 the pooled logits stay within 0.02: two prompts' rows differed by 1e-4
        pad_token_id=0,
    ),
    # Llama's names on other blocks (their tables are Llama's or OLMo 2's; before, the types were unmapped):
    # OLMo's norms have no weights, Cohere runs attention and MLP in parallel off one norm (logits scaled),
    # StableLM rotates a quarter of each head, Arcee's MLP has no gate, Apertus normalises queries and keys
    "olmo": lambda: tf.OlmoConfig(**_GQA),
    "cohere": lambda: tf.CohereConfig(**_GQA),
    "stablelm": lambda: tf.StableLmConfig(**_GQA),
    "helium": lambda: tf.HeliumConfig(**_GQA, head_dim=8),
    "seed_oss": lambda: tf.SeedOssConfig(**_GQA, head_dim=8),
    "arcee": lambda: tf.ArceeConfig(**_GQA, head_dim=8),
    "apertus": lambda: tf.ApertusConfig(**_GQA, head_dim=8),
    # ... and with a sliding-window layer (layer 0 slides over 4 tokens)
    "cohere2": lambda: tf.Cohere2Config(**_GQA, sliding_window=4, layer_types=_SLIDE_FULL),
    "ministral": lambda: tf.MinistralConfig(**_GQA, head_dim=8, sliding_window=4, layer_types=_SLIDE_FULL),
    "olmo3": lambda: tf.Olmo3Config(**_GQA, sliding_window=4, layer_types=_SLIDE_FULL),
    "exaone4": lambda: tf.Exaone4Config(**_GQA, head_dim=8, sliding_window=4, layer_types=_SLIDE_FULL),
    # BERT's names on other encoders: ESM (rotary positions, protein vocabularies), ERNIE (task type embeddings),
    # XLM-R XL and Megatron-BERT (norms before the sublayers; Megatron names them `ln`), Data2Vec-text (RoBERTa's)
    "esm": lambda: tf.EsmConfig(**_ENC, mask_token_id=3, position_embedding_type="rotary"),
    "ernie": lambda: tf.ErnieConfig(**_ENC),
    "xlm-roberta-xl": lambda: tf.XLMRobertaXLConfig(**_ENC),
    "megatron-bert": lambda: tf.MegatronBertConfig(**_ENC),
    "data2vec-text": lambda: tf.Data2VecTextConfig(**_ENC),
    # MPNet (the backbone mpnet-base): relative position bias built once per call by the encoder, added in
    # every attention; 32 buckets of up to 128 positions, as all-mpnet-base-v2's
    "mpnet": lambda: tf.MPNetConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=70,
        initializer_range=0.1,  # at 0.02 two prompts' pooled logits differed by 1e-4, as DeBERTa's
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
}
ARCHS = tuple(_CONFIGS)
ENCODERS = ("modernbert", "deberta-v2", "mpnet", "esm", "ernie", "xlm-roberta-xl", "megatron-bert", "data2vec-text")
NO_CACHE = ("modernbert", "deberta-v2", "mpnet", "esm")  # encoders whose attention takes no KV cache
CAUSAL = tuple(a for a in ARCHS if a not in ENCODERS)
SLIDING = (
    "qwen2",
    "gemma3_text",
    "mistral",
    "gemma2",
    "starcoder2",
    "cohere2",
    "ministral",
    "olmo3",
    "exaone4",
)  # decoders with a sliding-window layer
_AUTO = {
    "lm": tf.AutoModelForCausalLM,
    "cls": tf.AutoModelForSequenceClassification,
    "mlm": tf.AutoModelForMaskedLM,
}
MISSING = {
    ("olmo2", "cls"): V4,  # Olmo2ForSequenceClassification came with transformers 5
    ("granite", "cls"): not hasattr(tf, "GraniteForSequenceClassification"),  # none in 4.57 or 5.25
    **{(a, "cls"): not hasattr(tf, f"{c}ForSequenceClassification") for a, c in (
        ("olmo", "Olmo"), ("olmo3", "Olmo3"), ("cohere", "Cohere"), ("cohere2", "Cohere2"), ("apertus", "Apertus"))},
}  # fmt: skip


def heads(arch: str) -> tuple[str, ...]:
    return ("cls", "mlm") if arch in ENCODERS else ("lm", "cls")


CASES = [(a, h) for a in ARCHS for h in heads(a)]
MAIN = [(a, heads(a)[0]) for a in ARCHS]  # the LM head of each decoder, the encoders' classifier


def make_config(arch: str) -> tf.PretrainedConfig:
    config = _CONFIGS[arch]()
    config.num_labels = NUM_LABELS
    return config


def make_model(arch: str, head: str, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny model in eval mode; skips the test where this transformers lacks the class."""
    if MISSING.get((arch, head)):
        pytest.skip(f"transformers {tf.__version__} has no {arch} {head} model")
    torch.manual_seed(seed)
    return _AUTO[head].from_config(make_config(arch)).eval()


def make_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded rows (every second one 3 shorter), longer than the 4-token windows, with the head's labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch, 2):
        ids[i, seq - 3 :] = model.config.pad_token_id
        mask[i, seq - 3 :] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if type(model).__name__.endswith("ForSequenceClassification"):
        inputs["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    elif getattr(model.config, "is_encoder_decoder", False):  # a target sequence, also the decoder's inputs
        inputs["labels"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    else:
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def _unlabelled(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs without labels; an encoder-decoder LM decodes its labels (tests/test_arch_seq2seq.py)."""
    given = {k: v for k, v in inputs.items() if k != "labels"}
    if getattr(model.config, "is_encoder_decoder", False) and inputs.get("labels") is not None:
        given["decoder_input_ids"] = inputs["labels"]
    return given


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's logits."""
    with torch.no_grad():
        out = model(**_unlabelled(model, inputs))
    return out.logits if getattr(out, "logits", None) is not None else out.logits_per_image  # CLIP: no .logits


def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes over the whole sequence: no KV cache anywhere."""
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, out[:, -1:].argmax(-1)], dim=1)
    return ids


def keeps_promises(
    method: str,
    head: str,
    fresh: Callable[[], torch.nn.Module],
    tmp_path: Path,
    given: dict[str, torch.Tensor] | None = None,
    **settings,  # noqa: ANN003
) -> None:
    """What every method claims on a backbone `fresh()` builds: its output at init where it says so; gradients on the
    delta and, where a new classifier trains, the head, and on nothing else; a changed output once perturbed;
    merge == unmerged and unmerge back to the weights where it merges; a save/load round trip onto a fresh one.
    `given`: the inputs, with what makes a loss, for models that take no token ids (images, audio)."""
    from tiny import perturbed

    import deltatune as dt

    model = fresh()
    inputs = make_inputs(model) if given is None else given
    plain = logits(model, inputs)
    dm = dt.attach(model, method, **settings)
    config = dm.delta().config
    if config.identity_at_init:
        torch.testing.assert_close(logits(dm, inputs), plain, rtol=0, atol=1e-6)

    dm(**inputs).loss.backward()
    head_params = set(dm.head_parameter_names()) if head == "cls" else set()  # a new classifier trains
    assert head != "cls" or head_params, "the classification head is not found"
    for n, p in model.named_parameters():
        assert p.requires_grad == (p.grad is not None) == (n in head_params), n
    trained = [p for p in dm.delta().parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained), "a delta tensor got no gradient"
    dm.zero_grad(set_to_none=True)

    out = logits(perturbed(dm), inputs)
    # ModernBERT's small init keeps its MLM logits within 0.2 and moves them least (prompt, ia3: 3e-4)
    assert (out - plain).abs().max() > 1e-4, "perturbing the delta changed nothing"
    if config.can_merge:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        dm.merge()
        torch.testing.assert_close(logits(dm, inputs), out, rtol=0, atol=1e-5)
        dm.unmerge()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), weights[n], rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(logits(dm, inputs), out, rtol=0, atol=1e-5)

    dm.save_delta(tmp_path / "delta")  # with the classifier where it trained (perturbed too: it must come along)
    loaded = dt.load_delta(fresh(), tmp_path / "delta")
    torch.testing.assert_close(logits(loaded, inputs), out, rtol=0, atol=1e-6)


def prefilled_cache(delta: object, config: object, kv_heads: int, batch: int, copies: int = 1) -> object:
    """A DynamicCache holding each prefixed attention's prefix (heads of 8), what PEFT's route hands the model;
    `copies`: each key/value head repeated, for a cache that holds one per query head (Falcon 4.57)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, site in enumerate(delta._sites):
        n = delta.config.num_tokens
        kv = delta.prefix(site).view(2, n, kv_heads, 8).transpose(1, 2).repeat_interleave(copies, dim=1)
        cache.update(kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1), i)
    return cache


def assert_rows_alone(dm: object, inputs: dict[str, torch.Tensor], rows: list[str | None]) -> None:
    """Every row of a mixed batch (`delta_ids=rows`, deltas "a" and "b") equals that row under its delta alone."""
    with torch.no_grad():
        mixed = dm(**_unlabelled(dm, inputs), delta_ids=rows).logits
    alone = {}
    for name in ("a", "b", None):
        dm.set_active([] if name is None else name)
        alone[name] = logits(dm, inputs)
    assert not torch.allclose(alone["a"], alone["b"], rtol=0, atol=1e-4), "the two deltas agree: nothing is tested"
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=0, atol=1e-5)
