"""Module names as another library's saving model wrote them, read on this model.

The saving model and this one may differ by their head: `bert.encoder.layer.0...` saved from
BertForSequenceClassification is `encoder.layer.0...` on a bare BertModel, and the reverse.
"""

from __future__ import annotations

from torch import nn


def saved_name_candidates(model: nn.Module, saved: str) -> list[str]:
    """`saved`, then with the model's `base_model_prefix` taken off or put on: the names to look up in order."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [saved]
    if prefix and saved.startswith(prefix + "."):
        candidates.append(saved[len(prefix) + 1 :])
    if prefix and getattr(model, prefix, None) is not None:
        candidates.append(f"{prefix}.{saved}")
    return candidates
