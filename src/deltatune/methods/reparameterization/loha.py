"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): the update is a Hadamard product of two low-rank
matrices, dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b), so rank r factors reach rank up to r².

Initialisation as PEFT's (He-uniform factors, W2b zero, so training starts at the backbone); the
defaults are PEFT's (r = 8, alpha = 8). dW is built per call and applied beside the frozen layer;
merging adds it to W.
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
class LoHaConfig(DeltaConfig):
    method: ClassVar[str] = "loha"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "two pairs of rank-r factors whose products are multiplied entrywise into an update"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True
    peft_names: ClassVar[dict[str, str]] = {"rank": "r"}

    targets: Targets = ("attn.q", "attn.v")
    layers: Layers = None
    r: int = setting(8, size=True, limit="width")
    alpha: float = setting(8.0, gt=0)

    def build(self) -> LoHa:
        return LoHa(self)


class LoHaUpdate(LinearUpdate):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float) -> None:
        super().__init__()
        self.w1a, self.w2a = (nn.Parameter(torch.empty(out_features, r)) for _ in range(2))
        self.w1b, self.w2b = (nn.Parameter(torch.empty(r, in_features)) for _ in range(2))
        for p in (self.w1a, self.w1b, self.w2a):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.w2b)
        self.scaling = alpha / r

    def weight_delta(self) -> torch.Tensor:
        return (self.w1a @ self.w1b) * (self.w2a @ self.w2b) * self.scaling


class LoHa(LinearDelta):
    config: LoHaConfig

    def make_layer(self, name: str, module: nn.Module, in_features: int, out_features: int) -> LoHaUpdate:
        return LoHaUpdate(in_features, out_features, self.config.r, self.config.alpha)
