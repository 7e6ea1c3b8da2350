"""Prompt tuning: counts, padding independence, LM logits, generation, initialisations, errors."""

from __future__ import annotations

import pytest
import torch
from prefix_prompt_helpers import HIDDEN, _cache, _greedy_seq2seq, _prompt_ids, _row_alone
from tiny import ARCHS, CAUSAL, SEQ2SEQ, logits, make_inputs, make_model

import deltatune as dt
from deltatune.core import compat
from deltatune.methods.addition.prompt import PromptConfig


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_parameter_count_is_num_tokens_times_hidden(arch: str) -> None:
    dm = dt.attach(make_model(arch), PromptConfig(num_tokens=7), train_head=False)
    assert dm.trainable_parameters() == dm.delta_parameters() == 7 * HIDDEN
    assert list(dm.delta_state_dict()) == ["prompt"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_classification_row_depends_only_on_its_own_tokens(arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs(model, batch=2, seq=8)
    dm = dt.attach(model, PromptConfig(num_tokens=5, init="uniform"))
    batched = logits(dm, inputs)
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched[1], _row_alone(dm, inputs, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[0], _row_alone(dm, inputs, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", CAUSAL + SEQ2SEQ)
def test_prompt_changes_lm_logits_keeps_their_shape_and_disable_restores_backbone(arch: str) -> None:
    model = make_model(arch, "lm")
    inputs = make_inputs(model)
    before = logits(model, inputs)
    dm = dt.attach(model, PromptConfig(num_tokens=4, init="uniform"))
    after = logits(dm, inputs)
    assert after.shape == before.shape  # one logit row per input token: the prompt positions are not returned
    assert (after - before).abs().max() > 1e-4
    dm.disable("default")
    assert torch.equal(logits(dm, inputs), before)


@pytest.mark.parametrize("arch", CAUSAL)
def test_prompt_acts_without_a_mask_and_a_cache_as_with_them(arch: str) -> None:
    # input_ids alone with use_cache=False (what gradient checkpointing sets): transformers took the kept
    # positions (prompt at 0, then 0, 1, ... again) for packed sequences and hid the prompt from the text
    dm = dt.attach(make_model(arch, "lm"), PromptConfig(num_tokens=4, init="uniform"))
    ids = make_inputs(dm.backbone)["input_ids"]
    with torch.no_grad():
        masked = dm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    out = dm(input_ids=ids, labels=ids, use_cache=False)  # eval mode (no dropout), gradients on
    assert torch.allclose(out.logits, masked, atol=1e-6)
    out.loss.backward()
    assert dm.delta("default").prompt.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", CAUSAL)
def test_prompt_generation_of_a_left_padded_row_equals_it_alone(arch: str) -> None:
    dm = dt.attach(make_model(arch, "lm"), PromptConfig(num_tokens=4, init="uniform"))
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    batched = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = dm.generate(input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:], max_new_tokens=5, do_sample=False)
    assert torch.equal(batched[1, 2:], alone[0])


@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_prompt_seq2seq_prepends_to_encoder_only_and_generates(arch: str) -> None:
    dm = dt.attach(make_model(arch, "lm"), PromptConfig(num_tokens=4, init="uniform"))
    ids = _prompt_ids()
    with torch.no_grad():
        encoded = dm.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert encoded.shape[1] == ids.shape[1] + 4
    out = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert 2 <= out.shape[1] <= 6
    assert torch.equal(out, _greedy_seq2seq(dm, ids)[:, : out.shape[1]])


def test_prompt_decoding_step_with_a_cache_filled_without_the_prompt_is_refused() -> None:
    dm = dt.attach(make_model("gpt2", "lm"), PromptConfig(num_tokens=4))
    ids = _prompt_ids()
    dm.disable("default")
    with torch.no_grad():
        cache = compat.output_cache(dm(input_ids=ids, use_cache=True))
    dm.enable("default")
    with pytest.raises(ValueError, match="without this prompt"):
        dm(input_ids=ids[:, :1], **_cache(dm, cache))


def test_prompt_vocab_init_copies_seeded_vocabulary_rows() -> None:
    model = make_model("bert")
    table = model.get_input_embeddings().weight
    prompts = [
        dt.attach(make_model("bert"), PromptConfig(num_tokens=6, init="vocab", seed=s)).delta().prompt
        for s in (1, 1, 2)
    ]
    assert torch.equal(prompts[0], prompts[1]) and not torch.equal(prompts[0], prompts[2])
    for row in prompts[0]:
        assert (table == row).all(dim=1).any(), "a prompt row is not a vocabulary embedding"


def test_prompt_text_init_repeats_the_token_ids_to_num_tokens() -> None:
    model = make_model("t5")
    table = model.get_input_embeddings().weight.detach().clone()
    dm = dt.attach(model, PromptConfig(num_tokens=7, init="text", init_token_ids=[5, 6, 7]))
    assert torch.equal(dm.delta().prompt.detach(), table[[5, 6, 7, 5, 6, 7, 5]])


def test_prompt_random_inits_have_the_promised_scale() -> None:
    model = make_model("bert")
    std = model.get_input_embeddings().weight.std().item()
    normal = dt.attach(model, PromptConfig(num_tokens=100)).delta().prompt
    assert abs(normal.std().item() / std - 1) < 0.1
    uniform = dt.attach(make_model("bert"), PromptConfig(num_tokens=100, init="uniform")).delta().prompt
    assert uniform.min() >= -0.5 and uniform.max() <= 0.5 and uniform.std() > 0.25


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"num_tokens": 2.5}, "num_tokens"),
        ({"init": "zeros"}, "init must be one of"),
        ({"init": "vocab", "seed": "1"}, "seed"),
        ({"init": "vocab", "seed": True}, "seed"),
        ({"init": "text"}, "needs init_text"),
        ({"init": "text", "init_text": "great movie"}, "tokenizer_path"),
        ({"init_token_ids": [1, 2]}, "init='text'"),
        ({"init": "text", "init_token_ids": []}, "non-empty"),
    ],
)
def test_prompt_bad_config_raises_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dt.attach(make_model("bert"), PromptConfig(**kwargs))


def test_prompt_token_ids_outside_vocabulary_raise() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dt.attach(make_model("bert"), PromptConfig(num_tokens=3, init="text", init_token_ids=[5, 1000]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_rows_are_refused_for_prompts_and_kept_apart_by_prefixes(arch: str) -> None:
    """Packed rows (DataCollatorWithFlattening; TRL's packing): position_ids restart per sequence, no mask, and
    transformers keeps the sequences apart. A prompt prepended once per row let every later sequence read the
    ones before it (logits 0.1 off, silently); it is refused now. Prefix tuning keeps them apart (checked)."""
    import transformers as tf

    seqs = [[5, 6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 16, 17, 18, 19]]
    batch = tf.DataCollatorWithFlattening()([{"input_ids": s} for s in seqs])
    packed = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    prompt = dt.attach(make_model(arch, "lm"), "prompt", num_tokens=4)
    with pytest.raises(ValueError, match="prompt tuning on packed rows .* pad the batch instead"):
        prompt(**packed)
    prompt(input_ids=batch["input_ids"], use_cache=False)  # one long row is not packed
    prefix = dt.attach(make_model(arch, "lm"), "prefix", num_tokens=4)
    with torch.no_grad():
        for p in prefix.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        out = prefix(**packed).logits[0]
        starts = [0, 5, 9, 15]
        for s, a, b in zip(seqs, starts, starts[1:], strict=False):
            alone = prefix(input_ids=torch.tensor([s]), use_cache=False).logits[0]
            torch.testing.assert_close(out[a:b], alone, atol=1e-5, rtol=0)
