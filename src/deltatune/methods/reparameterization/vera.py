"""VeRA (Kopiczko et al. 2024): one pair of frozen random matrices A (r, in), B (out, r) shared by
every targeted layer, and per layer two trained vectors: dW = diag(lambda_b) B diag(lambda_d) A.

A and B are sized for the largest targeted layer (each layer uses its top-left slice) and regenerated
from `seed` exactly as PEFT draws them (He-uniform from one CPU generator, A first), so the saved
delta is only the vectors; the seed sits in the config. As PEFT's defaults: r = 256, lambda_d = 0.1,
lambda_b = 0 (training starts at the backbone). Merging adds dW to W.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.delta import DeltaConfig, Hooks, setting
from ...core.layers import linear_dims
from ...core.targeting import Layers, Targets
from ._linear_delta import LinearDelta, LinearUpdate


@dataclasses.dataclass
class VeRAConfig(DeltaConfig):
    method: ClassVar[str] = "vera"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "two scaling vectors per layer around frozen random matrices shared by all layers"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True
    default_lr: ClassVar[float] = 1e-2
    peft_names: ClassVar[dict[str, str]] = {"vera_dropout": "dropout", "projection_prng_key": "seed", "rank": "r"}

    targets: Targets = ("attn.q", "attn.v")
    layers: Layers = None
    r: int = setting(256, size=True)
    d_initial: float = 0.1
    dropout: float = setting(0.0, ge=0, lt=1)
    seed: int = setting(0, ge=0)

    def build(self) -> VeRA:
        return VeRA(self)


def projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, max_in) and B (max_out, r), He-uniform over their fan-in, from one seeded generator (PEFT's)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=g))
    return out[0], out[1]


class VeRAUpdate(LinearUpdate):
    def __init__(self, owner: VeRA, in_features: int, out_features: int) -> None:
        super().__init__()
        cfg = owner.config
        object.__setattr__(self, "_owner", owner)  # the shared A, B live on the delta, once
        self.in_features = in_features
        self.lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(out_features))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._owner.vera_A, self._owner.vera_B
        dtype = self.lambda_d.dtype
        return a[:, : self.in_features].to(dtype), b[: self.lambda_b.shape[0]].to(dtype)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._slices()
        return self.lambda_b * F.linear(self.lambda_d * F.linear(self.dropout(x.to(a.dtype)), a), b)

    def weight_delta(self) -> torch.Tensor:
        a, b = self._slices()
        return (self.lambda_b[:, None] * b) @ (self.lambda_d[:, None] * a)


class VeRA(LinearDelta):
    config: VeRAConfig

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        dims = [linear_dims(model.get_submodule(n)) for n in self.linear_targets(model)]
        a, b = projections(self.config.r, max(i for i, _ in dims), max(o for _, o in dims), self.config.seed)
        device = next(model.parameters()).device
        self.register_buffer("vera_A", a.to(device), persistent=False)
        self.register_buffer("vera_B", b.to(device), persistent=False)
        super().attach(model, hooks)

    def make_layer(self, name: str, module: nn.Module, in_features: int, out_features: int) -> VeRAUpdate:
        return VeRAUpdate(self, in_features, out_features)
