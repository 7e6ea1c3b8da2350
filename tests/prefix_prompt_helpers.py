"""Shared by test_prompt.py, test_prefix.py and test_prefix_prompt_generation.py: a row run alone, greedy
decoding by full forward passes, and the cache keyword of this transformers release.
"""

from __future__ import annotations

import torch
from tiny import logits

import deltatune as dt
from deltatune.core import compat

HIDDEN = 32  # every tiny model


def _row_alone(dm: dt.DeltaModel, inputs: dict, row: int) -> torch.Tensor:
    n = int(inputs["attention_mask"][row].sum())
    return logits(
        dm,
        {
            "input_ids": inputs["input_ids"][row : row + 1, :n],
            "attention_mask": inputs["attention_mask"][row : row + 1, :n],
        },
    )[0]


def _greedy(dm: dt.DeltaModel, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Greedy decoding by full forward passes, without any KV cache."""
    for _ in range(steps):
        with torch.no_grad():
            out = dm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, out[:, -1:].argmax(-1)], dim=1)
    return ids


def _greedy_seq2seq(dm: dt.DeltaModel, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    dec = torch.full((len(ids), 1), dm.config.decoder_start_token_id)
    for _ in range(steps):
        with torch.no_grad():
            out = dm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec, use_cache=False)
        dec = torch.cat([dec, out.logits[:, -1:].argmax(-1)], dim=1)
    return dec


def _cache(dm: dt.DeltaModel, cache) -> dict:  # noqa: ANN001
    """The model call's cache argument, under this release's name (past_key_values before 5.24, cache since)."""
    return {compat.cache_keyword(dm.backbone): cache}


def _prompt_ids(seed: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(seed))
