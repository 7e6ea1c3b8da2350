"""Shared by test_new_methods_peft.py and test_new_methods_behaviour.py."""

from __future__ import annotations

import torch


def _perturb(params, seed: int = 3, scale: float = 0.1) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)
