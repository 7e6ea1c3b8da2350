"""The established families users still fine-tune, mapped: GPT-J, CodeGen, GPT-Neo, GPT-BigCode (StarCoder 1),
BLOOM, Falcon (grouped and multi-query), ALBERT and DeBERTa (v1). Before, every method but prompt and bitfit was
refused on each ("alias 'attn.q' is not mapped for model type 'bloom'"), so a user had to know module names.
Where q|k|v interleave in one fused layer, `attn.q`/`attn.k`/`attn.v` name that layer (GPT-2's `c_attn` rule), so
every method's defaults learn, on the modules PEFT's defaults pick.

Each tiny config keeps what sets its family apart: BLOOM's ALiBi biases and interleaved `query_key_value`,
Falcon's grouped q|k|v layout (new decoder architecture, 2 key/value heads) and Falcon-7B's multi-query one,
GPT-BigCode's fused q|k|v with one key/value head, CodeGen's `qkv_proj` in four groups, GPT-J's and
CodeGen's partial rotary, GPT-Neo's learned positions and a local layer whose causal mask comes from a
fixed windowed buffer, ALBERT's one layer shared by every depth and narrower embeddings, DeBERTa's
head-by-head `in_proj` with its relative attention. Held to what tests/modern.py's table checks, plus prefix
against a prefilled KV cache and generate() against greedy decoding without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from modern import NUM_LABELS, VOCAB, assert_rows_alone, greedy, keeps_promises, logits, make_inputs, prefilled_cache
from tiny import perturbed

import deltatune as dt
from deltatune.core import compat, compat_config, registry
from deltatune.core.delta import safe_key
from deltatune.core.targeting import resolve

N = 3  # prefix keys and values per attention
_C = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENC = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
)
CONFIGS = {
    "gptj": lambda: tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, **_C),
    "codegen": lambda: tf.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64, **_C),
    # layer 0 global, layer 1 local over 16 tokens (longer than the 10-token inputs with a 3-token prefix)
    "gpt_neo": lambda: tf.GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=16,
        max_position_embeddings=64, **_C,
    ),
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_C),  # multi-query
    "bloom": lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **_C),
    "falcon": lambda: tf.FalconConfig(  # 40B's layout: 4 query heads in 2 groups, each with its key and value
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, **_C
    ),
    "falcon-mq": lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True, **_C),
    "albert": lambda: tf.AlbertConfig(embedding_size=16, **_ENC, **_C),
    "deberta": lambda: tf.DebertaConfig(**_ENC, relative_attention=True, pos_att_type=["c2p", "p2c"], **_C),
}  # fmt: skip
DECODERS = ("gptj", "codegen", "gpt_neo", "gpt_bigcode", "bloom", "falcon", "falcon-mq")
ENCODERS = ("albert", "deberta")
# where q|k|v interleave (head by head, or CodeGen's groups) in one fused layer, which attn.q/k/v name
FUSED = {"codegen": "qkv_proj", "bloom": "query_key_value", "falcon": "query_key_value", "deberta": "in_proj"}
_AUTO = {"lm": tf.AutoModelForCausalLM, "cls": tf.AutoModelForSequenceClassification, "mlm": tf.AutoModelForMaskedLM}
METHODS = tuple(sorted(registry.METHODS))
SMALL = {"prefix": {"num_tokens": N}, "prompt": {"num_tokens": 4}, "random_subset": {"count": 1000}}


def _fused(arch: str) -> str | None:
    return FUSED.get(arch.split("-")[0])


def _heads(arch: str) -> tuple[str, ...]:
    if arch == "codegen":
        return ("lm",)  # no CodeGenForSequenceClassification
    return ("cls", "mlm") if arch in ENCODERS else ("lm", "cls")


def _model(arch: str, head: str, seed: int = 0) -> torch.nn.Module:
    config = CONFIGS[arch]()
    config.num_labels = NUM_LABELS
    torch.manual_seed(seed)
    return _AUTO[head].from_config(config).eval()


def _settings(method: str) -> dict:
    """A method's defaults, smaller where its size follows the model."""
    return dict(SMALL.get(method, {}))


CASES = [(a, h, m) for a in CONFIGS for h in _heads(a) for m in METHODS if not (a == "deberta" and m == "prefix")]


@pytest.mark.parametrize("arch,head,method", CASES, ids=["-".join(c) for c in CASES])
def test_methods_keep_their_promises(arch: str, head: str, method: str, tmp_path: Path) -> None:
    # in float64: merged OFT on GPT-BigCode's classifier and merged LoRA on Falcon-7B's differed from unmerged by
    # 1.4e-5 and 1.3e-5 in float32 (logits up to 2.2; 2e-14 in float64), rounding that passes or not by the seed.
    # The prefix and generation tests below run in float32.
    keeps_promises(method, head, lambda: _model(arch, head).double(), tmp_path, **_settings(method))


@pytest.mark.parametrize("arch", CONFIGS)
def test_aliases_name_the_roles_and_the_fused_projection(arch: str) -> None:
    model = _model(arch, _heads(arch)[0])
    shared = arch == "albert"  # one layer module, called at every depth
    assert len(resolve(model, "attn")) == len(resolve(model, "layer")) == (1 if shared else 2)
    for alias in ("attn.o", "ffn.in", "ffn.out", "ln", "embeddings.word"):
        assert resolve(model, alias), alias
    queries = resolve(model, "attn.q")
    assert len(queries) == (1 if shared else 2)
    if _fused(arch):  # one fused layer per attention answers for all three
        assert all(n.endswith("." + _fused(arch)) for n in queries)
        assert resolve(model, "attn.k") == resolve(model, "attn.v") == queries


@pytest.mark.parametrize("arch", [a for a in CONFIGS if a != "albert"])  # PEFT has no default for ALBERT
def test_default_lora_targets_the_modules_peft_defaults_to(arch: str) -> None:
    """`dt.attach(model, "lora")` adapts what `get_peft_model(model, LoraConfig())` adapts. On the interleaved
    layouts it was refused, so LoRA's defaults (and `deltatune train`'s) did not run there at all."""
    peft = pytest.importorskip("peft")
    model = _model(arch, _heads(arch)[0])
    pm = peft.get_peft_model(_model(arch, _heads(arch)[0]), peft.LoraConfig(r=2))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    dm = dt.attach(model, "lora", r=2, train_head=False)
    ours = {n for n, _ in model.named_modules() if safe_key(n) in dm.deltas["default"].layers}
    assert ours == theirs and ours
    weights = [model.get_submodule(n).weight for n in ours]
    assert dm.trainable_parameters() == sum(2 * sum(w.shape) for w in weights)  # r x (in + out) each, r = 2


def test_albert_shares_one_delta_across_depths_as_it_shares_weights() -> None:
    """ALBERT's 2 depths run one layer module: LoRA on its query and value is one pair of factors (2 x 2 x 8 x 32),
    and it acts at both depths (a delta on depth 1 alone does not exist)."""
    model = _model("albert", "cls")
    calls = []
    attn = model.get_submodule(resolve(model, "attn")[0])
    attn.register_forward_hook(lambda *a: calls.append(1))
    dm = dt.attach(model, "lora", r=8)
    assert dm.trainable_parameters() - sum(p.numel() for p in model.classifier.parameters()) == 2 * 2 * 8 * 32
    logits(dm, make_inputs(model))
    assert len(calls) == 2


def test_deberta_prefix_is_refused_with_its_reason() -> None:
    with pytest.raises(compat.UnsupportedError, match=r"in_proj|takes no KV cache, and no one layer computes its keys"):
        dt.attach(_model("deberta", "cls"), "prefix")


@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_equals_a_kv_cache_prefilled_with_the_prefix(arch: str) -> None:
    """The key width comes from the config's heads (Falcon: 2 key/value heads of 8, multi-query and GPT-BigCode 1):
    a wrong one fails in the cache. BLOOM's ALiBi biases the prefix as keys before the first token, which the
    softmax cannot tell from PEFT's route (the prefix at positions 0..2, real tokens after)."""
    model = _model(arch, "lm")
    inputs = {k: v for k, v in make_inputs(model).items() if k != "labels"}
    dm = dt.attach(model, "prefix", num_tokens=N, reparameterize=False)
    delta = dm.delta()
    kv_heads = compat_config.attention_heads(model)[1]
    assert [s.width for s in delta._sites] == [kv_heads * 8] * 2
    with torch.no_grad():
        ours = dm(**inputs).logits
        dm.disable("default")
        batch = len(inputs["input_ids"])
        copies = 2 if arch == "falcon" and tf.__version__.startswith("4.") else 1  # 4.57: a copy per query head
        cache = prefilled_cache(delta, model.config, kv_heads, batch, copies)
        mask = torch.cat([torch.ones(batch, N, dtype=torch.long), inputs["attention_mask"]], dim=1)
        extra = (
            {} if arch == "bloom" else {"position_ids": torch.arange(inputs["input_ids"].shape[1]).expand(batch, -1)}
        )
        reference = dm(
            input_ids=inputs["input_ids"], attention_mask=mask, **extra, **{compat.cache_keyword(dm.backbone): cache}
        ).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=0, atol=1e-5)
    dm.enable("default")
    assert (dm(**inputs).logits - reference).abs().max() < 1e-5
    dm.disable("default")
    assert (logits(dm, inputs) - ours).abs().max() > 1e-3, "the prefix changes nothing: the comparison proves nothing"


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("arch", DECODERS)
def test_generate_equals_greedy_decoding_without_a_cache(arch: str, method: str) -> None:
    dm = perturbed(dt.attach(_model(arch, "lm"), method, **SMALL[method]), scale=0.5)
    dm.backbone.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = dm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(out, greedy(dm, ids, 6))
    delta = logits(dm, {"input_ids": out})
    dm.disable("default")
    # BLOOM's small init keeps its logits within 0.9: a perturbed prompt moves them by 6e-3
    assert (logits(dm, {"input_ids": out}) - delta).abs().max() > 1e-3, "the delta changes nothing"


def test_gpt_neo_prefix_beyond_its_local_window_is_refused() -> None:
    """GPT-Neo masks its local layers by a fixed windowed buffer that counts the prefix's keys as tokens: past
    16 - 3 tokens the prefix would slide out of the window for the last queries, a different function from
    every other layer's and model's (the prefix is attended by every token), without an error."""
    dm = dt.attach(_model("gpt_neo", "lm"), "prefix", num_tokens=N)
    logits(dm, {"input_ids": torch.randint(3, VOCAB, (1, 13))})  # 13 + 3 keys: the first still in every window
    with pytest.raises(compat.UnsupportedError, match=r"sees the prefix only up to 13 tokens; this call has 14"):
        logits(dm, {"input_ids": torch.randint(3, VOCAB, (1, 14))})


@pytest.mark.parametrize("arch", DECODERS + ENCODERS)
def test_each_row_of_a_mixed_batch_equals_its_delta_alone(arch: str) -> None:
    dm = dt.DeltaModel(_model(arch, _heads(arch)[-1]))
    for i, name in enumerate(("a", "b")):
        dm.add(name, dt.get_config("lora", **_settings("lora")), enabled=False)
        perturbed(dm, scale=0.3, seed=i)
    inputs = {k: v for k, v in make_inputs(dm.backbone, batch=4).items() if k != "labels"}
    assert_rows_alone(dm, inputs, ["a", None, "b", "a"])


def test_gpt_neo_prompt_past_its_causal_buffer_is_refused_in_one_line() -> None:
    """GPT-Neo masks by a buffer of max_position_embeddings (64 here) that counts the prompt's tokens: past it the
    call failed inside on a size ("The size of tensor a (64) must match the size of tensor b (110)"), in a forward
    and at a generation step alike."""
    dm = dt.attach(_model("gpt_neo", "lm"), "prompt", num_tokens=10)
    logits(dm, {"input_ids": torch.randint(3, VOCAB, (1, 54))})  # 10 + 54 = 64: fits
    with pytest.raises(ValueError, match=r"10 prompt tokens \+ 55 input tokens are more than the 64 positions"):
        logits(dm, {"input_ids": torch.randint(3, VOCAB, (1, 55))})
    dm.backbone.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="give at most 54 input tokens"):
        dm.generate(input_ids=torch.randint(3, VOCAB, (1, 50)), max_new_tokens=10, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("arch", ["bloom", "falcon", "gptj", "gpt_neo"])
def test_peft_adapters_made_on_these_families_import_with_pefts_outputs(arch: str, method: str, tmp_path: Path) -> None:
    """Files made elsewhere: PEFT's LoRA (on the fused `query_key_value` where q, k, v interleave), prefix tuning
    (its keys in a prefilled cache: on BLOOM the ALiBi positions differ from ours by a constant per query, which
    the softmax cancels) and prompt tuning, trained-looking (perturbed), saved by PEFT, imported by deltatune."""
    peft = pytest.importorskip("peft")
    from deltatune.interop import PeftFormatError, import_peft

    falcon_457_prefix = (arch, method) == ("falcon", "prefix") and tf.__version__.startswith("4.")

    configs = {
        "lora": peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["query_key_value"]) if _fused(arch)
        else peft.LoraConfig(task_type="CAUSAL_LM", r=4),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    }  # fmt: skip
    pm = peft.get_peft_model(_model(arch, "lm"), configs[method])
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pm.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -7:]  # prompt: real tokens
    pm.save_pretrained(tmp_path / "peft")
    if falcon_457_prefix:  # 4.57's Falcon caches a key per query head: PEFT's prefix has 4 heads, ours its 2 groups
        with pytest.raises(PeftFormatError, match="has a prefix for every query head"):
            import_peft(_model(arch, "lm"), tmp_path / "peft")
        return
    dm = import_peft(_model(arch, "lm"), tmp_path / "peft")
    torch.testing.assert_close(logits(dm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), theirs)
