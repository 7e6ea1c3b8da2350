"""The compatibility layer: what deltatune detects in the installed transformers, tested by name.

When a transformers release renames the attention's cache keyword again, the first test here fails
and says which line of `core/compat.py` to add; the methods keep working through the detection.
"""

from __future__ import annotations

import re

import pytest
import torch
from tiny import ARCHS, LM_ARCHS, make_inputs, make_model
from torch import nn
from transformers.cache_utils import Cache

import deltatune as dt
from deltatune.core import compat, compat_prompt
from deltatune.core.targeting import TargetError, resolve
from deltatune.methods.addition.prefix import PrefixConfig
from deltatune.methods.addition.prompt import PromptConfig

NO_CACHE = {"distilbert"}  # its attention never took a cache: prefix tuning uses placeholder rows there


def _attentions(arch: str) -> list[nn.Module]:
    model = make_model(arch, "lm" if arch in LM_ARCHS else "cls")
    names = resolve(model, "attn")
    try:
        names += resolve(model, "xattn")
    except TargetError:
        pass
    return [model.get_submodule(n) for n in names]


@pytest.mark.parametrize("arch", ARCHS)
def test_detected_cache_keywords_are_the_known_ones(arch: str) -> None:
    """The canary for upstream renames (5.24 renamed past_key_values to cache): one test, one table to edit."""
    for attention in _attentions(arch):
        found = compat.cache_keyword(attention)
        if arch in NO_CACHE:
            assert found is None
            continue
        assert found in compat.CACHE_KEYWORDS, (
            f"transformers {compat.VERSION}: {type(attention).__name__} takes its KV cache as {found!r}; "
            "add the name to compat.CACHE_KEYWORDS and a row to the table in core/compat.py"
        )


def test_cache_keyword_is_found_by_annotation_then_by_name() -> None:
    class Renamed(nn.Module):
        def forward(self, hidden_states: torch.Tensor, kv_memory: Cache | None = None) -> torch.Tensor:
            return hidden_states

    class Unannotated(nn.Module):  # T5 4.57: past_key_values=None without an annotation
        def forward(self, hidden_states, mask=None, past_key_values=None):  # noqa: ANN001, ANN201
            return hidden_states

    class NoCache(nn.Module):
        def forward(self, hidden_states: torch.Tensor, cache_position: torch.Tensor | None = None) -> torch.Tensor:
            return hidden_states

    assert compat.cache_keyword(Renamed()) == "kv_memory"
    assert compat.cache_keyword(Unannotated()) == "past_key_values"
    assert compat.mask_keyword(Unannotated()) == "mask"
    assert compat.cache_keyword(NoCache()) is None


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bart"])
def test_a_decoder_attention_without_a_cache_is_a_clear_error_naming_the_version(monkeypatch, arch: str) -> None:
    """What a future rename that detection misses looks like: an error at attach, never a silent difference
    (a decoder's attention cannot take the placeholder-row route: its cached steps would store the rows)."""
    monkeypatch.setattr(compat, "cache_keyword", lambda module: None)
    with pytest.raises(
        compat.UnsupportedError, match=rf"cannot reach the keys.*transformers {re.escape(compat.VERSION)}"
    ):
        dt.attach(make_model(arch, "lm"), PrefixConfig(num_tokens=2))


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "gpt2", "llama"])
def test_real_positions_are_the_stacks_own_numbering(arch: str) -> None:
    """Prompt tuning passes these positions explicitly: they must be what the stack uses when given none."""
    stack = make_model(arch).base_model
    if "position_ids" not in compat.signature(stack).parameters:
        pytest.skip(f"{type(stack).__name__} takes no position_ids in transformers {compat.VERSION}: none are passed")
    pad = stack.config.pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, pad, pad]])
    mask = (ids != pad).long()
    embeds = stack.get_input_embeddings()(ids)
    positions, first = compat_prompt.real_positions(stack, ids, embeds, None)
    assert first == (pad + 1 if arch == "roberta" else 0)
    with torch.no_grad():
        own = stack(input_ids=ids, attention_mask=mask).last_hidden_state
        given = stack(input_ids=ids, attention_mask=mask, position_ids=positions.expand(2, -1)).last_hidden_state
    torch.testing.assert_close(given[mask.bool()], own[mask.bool()], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "bart"])
def test_a_prompt_longer_than_the_position_table_runs(arch: str) -> None:
    """Prompt vectors take no positions of their own, so a 100-token prompt fits a 64-position model. BERT
    fills missing token types, DistilBERT 4.x its positions, from buffers as long as that table."""
    model = make_model(arch)
    ids = make_inputs(model)["input_ids"]  # BART classifies at the </s> these rows end with
    dm = dt.attach(model, PromptConfig(num_tokens=100, init="uniform"))
    with torch.no_grad():
        implicit = dm(input_ids=ids).logits
        assert implicit.shape == (2, 3) and implicit.isfinite().all()
        if arch == "bert":
            explicit = dm(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
            torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_and_decoder_are_found_on_every_head(arch: str) -> None:
    """4.57's *ForSequenceClassification have no get_encoder and a get_decoder that returns the model."""
    for head in ("cls", "lm"):
        model = make_model(arch, head)
        enc, dec = compat.encoder(model), compat.decoder(model)
        assert enc is not dec and enc is not model and dec is not model
        assert any(m is enc for m in model.modules()) and any(m is dec for m in model.modules())
