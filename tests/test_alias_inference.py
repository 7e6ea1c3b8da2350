"""Model types outside our alias tables whose module names follow one of them (core/alias_inference.py).

Before, every method's defaults were refused on them ("alias 'attn.q' is not mapped for model type 'nemotron'"):
Nemotron, DiffLlama (Llama's names), RoFormer, BigBird, Longformer (BERT's), XGLM (BART's) and, in transformers 5.25, about 60
more types named as Llama, BERT, BART or GPT-2 are. Each method but prefix tuning (which needs a mapped
attention) now keeps tests/modern.py's promises on them, with one warning naming the table used. (OLMo, Cohere
nine more Llama-named types, ESM, ERNIE and four more BERT-named ones are mapped outright and tested in tests/modern.py, prefix included.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from modern import NUM_LABELS, VOCAB, keeps_promises
from tiny import perturbed

import deltatune as dt
from deltatune.core import alias_inference, registry
from deltatune.core.targeting import TargetError, resolve

_C = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, pad_token_id=0,
)  # fmt: skip
CONFIGS = {  # model type -> (config, the table its names follow, the module answering attn.q)
    "nemotron": (lambda: tf.NemotronConfig(num_key_value_heads=2, head_dim=8, **_C), "llama", "self_attn.q_proj"),
    "diffllama": (lambda: tf.DiffLlamaConfig(num_key_value_heads=2, **_C), "llama", "self_attn.q_proj"),
    "roformer": (lambda: tf.RoFormerConfig(**_C), "bert", "attention.self.query"),
    "big_bird": (lambda: tf.BigBirdConfig(attention_type="original_full", **_C), "bert", "attention.self.query"),
    # local attention over 4-token windows; its classifier gives the first token global attention
    "longformer": (lambda: tf.LongformerConfig(attention_window=4, **_C), "bert", "attention.self.query"),
    "xglm": (
        lambda: tf.XGLMConfig(
            d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64
        ),
        "bart",
        "self_attn.q_proj",
    ),
}
DECODERS = ("nemotron", "diffllama", "xglm")
METHODS = sorted(m for m in registry.METHODS if m != "prefix")
SMALL = {"prompt": {"num_tokens": 4}, "random_subset": {"count": 1000}}


def _model(arch: str, head: str) -> torch.nn.Module:
    config = CONFIGS[arch][0]()
    config.num_labels = NUM_LABELS
    torch.manual_seed(0)
    auto = tf.AutoModelForCausalLM if head == "lm" else tf.AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on tiny configs
        return auto.from_config(config).eval()


def _wide(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """float64, which keeps merge == unmerged clear of float32 rounding; XGLM's attention fails in it inside
    transformers (`torch.full((), finfo(float64).min)` into a float32 tensor), so it stays in float32."""
    return model if arch == "xglm" else model.double()


def _head(arch: str) -> str:
    return "lm" if arch in DECODERS else "cls"


@pytest.mark.parametrize("arch", CONFIGS)
def test_the_aliases_follow_the_table_the_names_follow_and_say_so_once(arch: str) -> None:
    model = _model(arch, _head(arch))
    alias_inference._warned.discard(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        queries = resolve(model, "attn.q")
        resolve(model, "ffn.out")
    said = [str(w.message) for w in caught if "alias tables" in str(w.message)]
    assert len(said) == 1 and f"its module names follow {CONFIGS[arch][1]}'s" in said[0]
    assert len(queries) == 2 and all(q.endswith(CONFIGS[arch][2]) for q in queries)
    with pytest.raises(
        ValueError,
        match=rf"prefix tuning hooks attention modules .* model type '{arch}' are not among them \(alias 'attn'",
    ):
        dt.attach(model, "prefix")  # how each attention takes its keys is checked family by family


# BigBird's classifier reads the first token itself and never calls the base model's pooler: BitFit's delta on
# the pooler's bias gets no gradient, as that bias would not (the promise "every delta tensor learns" fails there)
UNUSED_MODULE = {("big_bird", "bitfit")}
# DiffLlama normalises each attention's output (`self_attn.groupnorm`), which Llama's `ln` does not name: `ln` is
# not inferred there, rather than name some of its norms
NO_LN = ("diffllama",)
CASES = [(a, m) for a in CONFIGS for m in METHODS if (a, m) not in UNUSED_MODULE]


@pytest.mark.parametrize("arch,method", CASES, ids=["-".join(c) for c in CASES])
def test_methods_keep_their_promises(arch: str, method: str, tmp_path: Path) -> None:
    head = _head(arch)
    if arch in NO_LN and method in ("layernorm", "norm_adapter"):  # their default target is `ln`
        with pytest.raises(TargetError, match=rf"alias 'ln' is not mapped for model type '{arch}'"):
            dt.attach(_model(arch, head), method)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        keeps_promises(method, head, lambda: _wide(_model(arch, head), arch), tmp_path, **SMALL.get(method, {}))


def test_names_that_follow_no_table_are_refused_as_before() -> None:
    """Mamba has no attention projections: nothing is inferred, and the line lists the mapped types."""
    config = tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4)
    with pytest.raises(TargetError, match=r"alias 'attn.q' is not mapped for model type 'mamba' \(mapped: albert"):
        resolve(tf.MambaForCausalLM(config), "attn.q")


def test_a_prompt_on_longformer_keeps_the_first_token_global_and_the_prompt_local() -> None:
    """Longformer's classifier gives the first token global attention by a mask built from the input ids; the
    prompt's rows failed it on a size. They now join that mask as local rows: the same as the encoder called with
    the prompt's vectors in front, its rows local, the first real token global (positions: the prompt at the
    first, real tokens as numbered without it)."""
    model = _model("longformer", "cls").double()
    dm = dt.attach(model, "prompt", num_tokens=3)
    perturbed(dm, scale=0.5)
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        out = dm(input_ids=ids).logits
        dm.disable()  # the encoder by hand, without the prompt's hook
        prompt = dm.delta().prompt.detach().double().expand(2, -1, -1)
        embeds = torch.cat([prompt, model.get_input_embeddings()(ids)], dim=1)
        glob = torch.zeros(2, 10, dtype=torch.long)
        glob[:, 3] = 1
        first = model.config.pad_token_id + 1
        positions = torch.cat([torch.full((2, 3), first), torch.arange(first, first + 7).expand(2, -1)], dim=1)
        hidden = model.longformer(inputs_embeds=embeds, global_attention_mask=glob, position_ids=positions)[0]
        by_hand = model.classifier(hidden[:, 3:])  # the prompt's rows leave the output: the head reads the first token
    torch.testing.assert_close(out, by_hand, rtol=0, atol=1e-10)


def test_ln_is_not_inferred_where_the_table_names_only_some_norms_of_the_layers() -> None:
    """XLM-R XL (mapped now) adds `self_attn_layer_norm` to BERT's norm names: read from BERT's table, `ln` named
    one of its two norms per layer, without a word. Inference leaves `ln` out there; BERT itself keeps it."""

    def inferred(model: torch.nn.Module) -> tuple[str, dict[str, str]] | None:
        modules = list(model.named_modules())
        norms = [n for n, m in modules if "norm" in type(m).__name__.lower()]
        return alias_inference._inferred([n for n, _ in modules], norms)

    config = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    canon, table = inferred(tf.XLMRobertaXLForMaskedLM(tf.XLMRobertaXLConfig(**config)))
    assert canon == "bert" and "ln" not in table and "attn.q" in table and "attn" not in table
    canon, table = inferred(tf.BertForMaskedLM(tf.BertConfig(**config)))
    assert canon == "bert" and "ln" in table


def test_a_prompt_past_roformers_rotary_table_is_refused_in_one_line() -> None:
    """RoFormer numbers its rotary positions by the whole sequence's length, prompt rows included, from a table
    of max_position_embeddings rows (64 here): past it transformers failed with "IndexError: index out of range
    in self" (the default 100 prompt tokens alone did)."""
    with pytest.raises(ValueError, match=r"num_tokens is 100, but RoFormerModel's position table numbers 64 positions"):
        dt.attach(_model("roformer", "cls"), "prompt")
    dm = dt.attach(_model("roformer", "cls"), "prompt", num_tokens=4)
    dm(input_ids=torch.randint(3, VOCAB, (1, 60)))  # 4 + 60 = 64: fits
    with pytest.raises(ValueError, match=r"4 prompt tokens \+ 61 input tokens are more than the 64 positions"):
        dm(input_ids=torch.randint(3, VOCAB, (1, 61)))
