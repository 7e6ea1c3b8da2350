"""The architectures users fine-tune in 2026 (Qwen3, Qwen2, Gemma 3, Mistral, Phi-3, SmolLM3, OLMo 2,
ModernBERT, and Gemma, Gemma 2, Granite, StarCoder2, Phi-2, OPT, DeBERTa v3) under the main methods with their default settings, on each head (tests/modern.py).

Every case attaches (none is refused since the alias tables map these model types) and keeps what
the method claims: the backbone's output at init where it says so, a changed output once perturbed,
gradients on the delta (and the task head where it trains) only, merge == unmerged and unmerge back
where it merges, and a save/load round trip onto a fresh backbone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from modern import ARCHS, CASES, heads, keeps_promises, make_model

import deltatune as dt
from deltatune.core.targeting import TargetError, resolve

METHODS = (
    "lora", "adapter", "parallel_adapter", "prefix", "prompt", "bitfit", "ia3",
    "dora", "layernorm", "compacter", "vera", "loha", "lokr", "oft",
)  # fmt: skip


def _ids(case: tuple) -> str:
    return "-".join(case)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,head", CASES, ids=map(_ids, CASES))
def test_default_settings_attach_and_keep_their_promises(arch: str, head: str, method: str, tmp_path: Path) -> None:
    if (arch, method) == ("esm", "bitfit"):
        pytest.skip("ESM's base model holds a contact head its classifier never calls: that bias gets no gradient")
    if (arch, method) == ("olmo", "layernorm"):  # OLMo's norms have no weight or bias: nothing to tune, said so
        with pytest.raises(ValueError, match="have no affine weight or bias"):
            keeps_promises(method, head, lambda: make_model(arch, head), tmp_path)
        return
    keeps_promises(method, head, lambda: make_model(arch, head), tmp_path)


# What each alias names on each architecture's first layer: fused projections are the honest answer.
FIRST_LAYER = {
    "qwen3": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj|mlp.up_proj", "mlp.down_proj"),
    "phi3": ("self_attn.qkv_proj",) * 3 + ("mlp.gate_up_proj", "mlp.down_proj"),
    "phi": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2"),
    "starcoder2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.c_fc", "mlp.c_proj"),
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1", "fc2"),
    "modernbert": ("attn.Wqkv",) * 3 + ("mlp.Wi", "mlp.Wo"),
    "deberta-v2": tuple(f"attention.self.{p}_proj" for p in ("query", "key", "value"))
    + ("intermediate.dense", "output.dense"),
    "mpnet": tuple(f"attention.attn.{p}" for p in "qkv") + ("intermediate.dense", "output.dense"),
    **dict.fromkeys(
        ("esm", "ernie", "xlm-roberta-xl", "megatron-bert", "data2vec-text"),
        tuple(f"attention.self.{p}" for p in ("query", "key", "value")) + ("intermediate.dense", "output.dense"),
    ),
    **dict.fromkeys(("arcee", "apertus"), ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj",
                                           "mlp.down_proj")),  # no gate projection
}  # fmt: skip
BERT_DECODABLE = ("esm", "ernie", "xlm-roberta-xl", "megatron-bert", "data2vec-text")
_LLAMA_NORMS = {"layers.N.input_layernorm", "layers.N.post_attention_layernorm", "model.norm"}
NORMS = {  # `ln`: the norms on the residual stream (layer numbers as N), not the per-head q_norm/k_norm
    **dict.fromkeys(
        (
            "qwen3",
            "qwen2",
            "mistral",
            "phi3",
            "smollm3",
            "gemma",
            "granite",
            "starcoder2",
            "olmo",
            "stablelm",
            "helium",
            "seed_oss",
            "arcee",
            "ministral",
        ),
        _LLAMA_NORMS,
    ),  # fmt: skip
    # Cohere runs attention and MLP off one norm, as Phi-2
    **dict.fromkeys(("cohere", "cohere2"), {"layers.N.input_layernorm", "model.norm"}),
    "apertus": {"layers.N.attention_layernorm", "layers.N.feedforward_layernorm", "model.norm"},
    **dict.fromkeys(
        ("gemma3_text", "gemma2"),
        _LLAMA_NORMS | {"layers.N.pre_feedforward_layernorm", "layers.N.post_feedforward_layernorm"},
    ),
    "phi": {"layers.N.input_layernorm", "model.final_layernorm"},  # one norm feeds attention and MLP alike
    "opt": {"layers.N.self_attn_layer_norm", "layers.N.final_layer_norm", "model.decoder.final_layer_norm"},
    **dict.fromkeys(
        ("olmo2", "olmo3", "exaone4"),
        {"layers.N.post_attention_layernorm", "layers.N.post_feedforward_layernorm", "model.norm"},
    ),
    # layer 0's attn_norm is an nn.Identity; the head's norm belongs to the head
    "modernbert": {"model.embeddings.norm", "layers.N.mlp_norm", "layers.N.attn_norm", "model.final_norm"},
    # not encoder.LayerNorm, the norm of the relative position embeddings
    "deberta-v2": {"deberta.embeddings.LayerNorm", "layers.N.attention.output.LayerNorm", "layers.N.output.LayerNorm"},
    "mpnet": {"mpnet.embeddings.LayerNorm", "layers.N.attention.LayerNorm", "layers.N.output.LayerNorm"},
    **{
        a: {f"{prefix}.embeddings.LayerNorm", "layers.N.attention.output.LayerNorm", "layers.N.output.LayerNorm"}
        for a, prefix in (("ernie", "ernie"), ("data2vec-text", "data2vec_text"))
    },
    "esm": {"layers.N.attention.LayerNorm", "layers.N.LayerNorm", "esm.encoder.emb_layer_norm_after"},
    # pre-norms: before attention (`self_attn_layer_norm`, which BERT's table missed) and before the FFN
    "xlm-roberta-xl": {"layers.N.attention.self_attn_layer_norm", "layers.N.LayerNorm", "roberta.encoder.LayerNorm"},
    "megatron-bert": {"layers.N.attention.ln", "layers.N.ln", "bert.encoder.ln"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_aliases_name_the_same_roles(arch: str) -> None:
    model = make_model(arch, heads(arch)[0])
    layer0 = resolve(model, "layer")[0] + "."  # model.layers.0. (OPT: model.decoder.layers.0.)
    q, k, v, ffn_in, ffn_out = FIRST_LAYER.get(arch, FIRST_LAYER["qwen3"])
    for alias, tail in (("attn.q", q), ("attn.k", k), ("attn.v", v), ("ffn.out", ffn_out)):
        assert [n for n in resolve(model, alias) if n.startswith(layer0)] == [layer0 + tail], alias
    assert [n for n in resolve(model, "ffn.in") if n.startswith(layer0)] == [layer0 + t for t in ffn_in.split("|")]
    norms = resolve(model, "ln")
    assert {re.sub(r"^.*\blayers?\.\d+", "layers.N", n) for n in norms} == NORMS[arch]
    assert all(type(model.get_submodule(n)).__name__ != "Identity" for n in norms), norms
    assert len(resolve(model, "attn")) == len(resolve(model, "layer")) == 2
    if arch in BERT_DECODABLE:  # BERT's table: these take cross-attention when built as decoders
        with pytest.raises(TargetError, match=r"target 'xattn.q' matches no module"):
            resolve(model, "xattn.q")
        return
    with pytest.raises(TargetError, match=r"has no 'xattn.q' \(its aliases: attn.q"):
        resolve(model, "xattn.q")  # no cross-attention: refused by name, not an empty selection


def test_olmo_norms_without_weights_are_refused_for_layernorm_tuning_and_take_a_norm_adapter() -> None:
    """OLMo's LayerNorm has no affine weight: layernorm tuning says so; the norm adapter takes its width from
    `normalized_shape` (it was refused as "a OlmoLayerNorm, not a normalisation layer")."""
    with pytest.raises(ValueError, match="have no affine weight or bias"):
        dt.attach(make_model("olmo", "lm"), "layernorm")
    dm = dt.attach(make_model("olmo", "lm"), "norm_adapter")
    assert dm.trainable_parameters() > 0
