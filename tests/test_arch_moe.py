"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): attention aliases mapped, the fused experts refused by name."""

from __future__ import annotations

import pytest
import torch
from tiny import logits, make_inputs, perturbed

import deltatune as dt
from deltatune.core.targeting import TargetError

transformers = pytest.importorskip("transformers")


def _moe(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    common |= dict(num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, **common)
        return transformers.MixtralForCausalLM(config).eval()
    if kind == "qwen2_moe":  # routed experts beside a gated shared expert
        config = transformers.Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, **common
        )
        return transformers.Qwen2MoeForCausalLM(config).eval()
    config = transformers.Qwen3MoeConfig(moe_intermediate_size=32, num_experts=4, head_dim=8, **common)
    return transformers.Qwen3MoeForCausalLM(config).eval()


KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "dora", "prefix", "prompt", "bitfit", "layernorm"])
def test_methods_on_attention_and_norms_act_exactly(kind: str, method: str) -> None:
    model = _moe(kind)
    inputs = make_inputs(model)
    base = logits(model, inputs)
    dm = dt.attach(model, method)
    if type(dm.delta().config).identity_at_init:
        assert (logits(dm, inputs) - base).abs().max() < 1e-6
    perturbed(dm, scale=0.1)
    out = logits(dm, inputs)
    assert (out - base).abs().max() > 1e-4
    if dm.delta().config.can_merge:
        dm.merge()
        assert (logits(dm, inputs) - out).abs().max() < 1e-5
        dm.unmerge()
    assert (dm.detach() is model) and (logits(model, inputs) - base).abs().max() < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_the_fused_experts_are_refused_by_name_with_the_type_s_aliases(kind: str) -> None:
    with pytest.raises(
        TargetError, match=rf"'{kind}' has no 'ffn.out': its FFN is a mixture of experts.* \(its aliases: attn.q, .*\)"
    ):
        dt.attach(_moe(kind), "adapter")
