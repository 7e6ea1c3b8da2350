"""LoKr (Edalati et al. 2022, KronA; LyCORIS): the update is a Kronecker product,
dW = (alpha / r) * W1 ⊗ W2, with W (out, in) split as out = a·b, in = c·d near their square roots.

As PEFT's defaults (r = 8, alpha = 8, decompose_both False): W1 (a, c) is full and zero at init;
W2 (b, d) is full when r >= max(b, d) / 2 and else the rank-r product W2a W2b (He-uniform init),
so a tiny W1 times a low-rank W2 covers the whole matrix. `factor` > 0 fixes a = c = factor where
it divides, as PEFT's decompose_factor. Merging adds dW to W.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import DeltaConfig, setting
from ...core.targeting import Layers, Targets
from ._linear_delta import LinearDelta, LinearUpdate


@dataclasses.dataclass
class LoKrConfig(DeltaConfig):
    method: ClassVar[str] = "lokr"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "two factors whose Kronecker product is an update (the larger one low-rank)"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True
    peft_names: ClassVar[dict[str, str]] = {"rank": "r", "decompose_factor": "factor"}

    targets: Targets = ("attn.q", "attn.v")
    layers: Layers = None
    r: int = setting(8, size=True, limit="width")
    alpha: float = setting(8.0, gt=0)
    factor: int = setting(-1, ge=-1)

    def validate(self) -> None:
        super().validate()
        if self.factor == 0:
            raise ValueError("LoKrConfig.factor must be -1 (split near the square root) or a positive divisor, got 0")

    def build(self) -> LoKr:
        return LoKr(self)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension, m as close to `factor` (or to sqrt(dimension)) as PEFT picks it."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrUpdate(LinearUpdate):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, factor: int) -> None:
        super().__init__()
        (a, b), (c, d) = factorization(out_features, factor), factorization(in_features, factor)
        self.w1 = nn.Parameter(torch.zeros(a, c))
        if r >= max(b, d) / 2:
            self.w2 = nn.Parameter(torch.empty(b, d))
            nn.init.kaiming_uniform_(self.w2, a=math.sqrt(5))
        else:
            self.w2a, self.w2b = nn.Parameter(torch.empty(b, r)), nn.Parameter(torch.empty(r, d))
            nn.init.kaiming_uniform_(self.w2a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.w2b, a=math.sqrt(5))
        self.scaling = alpha / r

    def weight_delta(self) -> torch.Tensor:
        w2 = self.w2 if hasattr(self, "w2") else self.w2a @ self.w2b
        return torch.kron(self.w1, w2) * self.scaling


class LoKr(LinearDelta):
    config: LoKrConfig

    def make_layer(self, name: str, module: nn.Module, in_features: int, out_features: int) -> LoKrUpdate:
        cfg = self.config
        return LoKrUpdate(in_features, out_features, cfg.r, cfg.alpha, cfg.factor)
