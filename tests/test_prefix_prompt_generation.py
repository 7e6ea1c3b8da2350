"""Prompt tuning and prefix tuning alike: generate() and a cached decoding step against full forward passes."""

from __future__ import annotations

import pytest
import torch
from prefix_prompt_helpers import _cache, _greedy, _greedy_seq2seq, _prompt_ids
from tiny import CAUSAL, LM_ARCHS, SEQ2SEQ, make_model, perturbed

import deltatune as dt
from deltatune.core import compat
from deltatune.methods.addition.prefix import PrefixConfig
from deltatune.methods.addition.prompt import PromptConfig


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", LM_ARCHS)
def test_generate_equals_a_full_forward_greedy_loop(arch: str, method: str) -> None:
    """generate() decodes from the KV cache, the loop recomputes everything without one: a delta that the
    cached steps lose or apply twice (5.24 renamed the cache keyword: prompts were prepended at every
    step, prefixes refused) makes them differ."""
    seq2seq = arch in SEQ2SEQ
    config = (
        PromptConfig(num_tokens=4, init="uniform")
        if method == "prompt"
        else PrefixConfig(num_tokens=4, reparameterize=False, cross_attention=seq2seq)
    )
    dm = dt.attach(make_model(arch, "lm"), config)
    with torch.no_grad():
        for p in dm.delta().parameters():
            p.mul_(3)  # a delta strong enough to move the scores
    ids = _prompt_ids()
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "do_sample": False}
    out = dm.generate(**kwargs, output_scores=True, return_dict_in_generate=True)
    loop = _greedy_seq2seq(dm, ids, 8) if seq2seq else _greedy(dm, ids, 8)
    assert out.sequences.shape[1] >= (2 if seq2seq else ids.shape[1] + 1)
    assert torch.equal(out.sequences, loop[:, : out.sequences.shape[1]])
    # and the scores of every step, not only their argmax (a tiny model's argmax can survive a wrong step)
    start = 1 if seq2seq else ids.shape[1]
    for step, scores in enumerate(out.scores):
        seen = out.sequences[:, : start + step]
        with torch.no_grad():
            if seq2seq:
                full = dm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=seen, use_cache=False)
            else:
                full = dm(input_ids=seen, attention_mask=torch.ones_like(seen), use_cache=False)
        torch.testing.assert_close(scores, full.logits[:, -1], rtol=0, atol=1e-4)
    dm.disable("default")
    plain = dm.generate(**kwargs, output_scores=True, return_dict_in_generate=True)
    assert (out.scores[0] - plain.scores[0]).abs().max() > 1e-3  # the delta is really there


@pytest.mark.parametrize("method", [PromptConfig(num_tokens=4, init="uniform"), PrefixConfig(num_tokens=4)])
@pytest.mark.parametrize("arch", CAUSAL)
def test_a_cached_decoding_step_equals_the_full_forward(arch: str, method) -> None:
    """Without generate's position ids: the delta itself must keep positions and the mask right."""
    dm = dt.attach(make_model(arch, "lm"), method)
    ids = _prompt_ids(length=7)
    with torch.no_grad():
        full = dm(input_ids=ids).logits[:, -1]
        cache = compat.output_cache(dm(input_ids=ids[:, :-1], use_cache=True))
        step = dm(input_ids=ids[:, -1:], **_cache(dm, cache), attention_mask=torch.ones_like(ids)).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_fixed_size_kv_cache_is_refused_when_asked_and_replaced_when_only_the_default(method: str) -> None:
    """A static cache is sized for the prompt and the new tokens: prompt tuning failed in it with "index 7 is
    out of bounds for dimension 2 with size 7", prefix tuning with "size of tensor a (13) must match ... (10)".
    Asked for, it is refused; as the checkpoint's default (Gemma 3's generation_config: "hybrid") the call
    uses the dynamic cache and gives its tokens. LoRA keeps the static cache."""
    dm = perturbed(dt.attach(make_model("llama", head="lm"), method), scale=0.1)
    ids = torch.tensor([[5, 6, 7, 8]])
    dynamic = dm.generate(ids, max_new_tokens=4, do_sample=False)
    with pytest.raises(dt.DeltaError, match=rf"\({method}\) cannot generate with a fixed-size KV cache \('static'\)"):
        dm.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    dm.backbone.generation_config.cache_implementation = "static"
    assert dm.generate(ids, max_new_tokens=4, do_sample=False).tolist() == dynamic.tolist()
    lora = perturbed(dt.attach(make_model("llama", head="lm"), "lora"), scale=0.1)
    expected = lora.generate(ids, max_new_tokens=4, do_sample=False)
    assert (
        lora.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static").tolist()
        == expected.tolist()
    )
