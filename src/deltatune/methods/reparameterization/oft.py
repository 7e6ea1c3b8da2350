"""OFT (Qiu et al. 2023): the layer's input is rotated by a block-diagonal orthogonal matrix before W,
W' = W R^T, so the angles between W's neurons (its "hyperspherical energy") are kept.

Each block R_i = (I + Q_i)(I - Q_i)^-1 is the Cayley transform of a skew-symmetric Q_i, which holds
b(b-1)/2 trained numbers for block size b; Q = 0 at init, so R = I. As in PEFT (its defaults: block
size 32, the Cayley-Neumann series with 5 terms, I + 2Q + 2Q² + 2Q³ + Q⁴), the inverse is
approximated by a series; `cayley_neumann=False` solves it exactly. A block size that does not divide
the layer's input width is moved to the nearest divisor, as PEFT does. Merging writes W R^T into W
(exact: the merged layer computes what the rotated one does); unmerging restores W bitwise.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import DeltaConfig, Hooks, setting
from ...core.targeting import Layers, Targets
from ._linear_delta import LinearDelta, LinearUpdate, map_first_input


@dataclasses.dataclass
class OFTConfig(DeltaConfig):
    method: ClassVar[str] = "oft"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "skew-symmetric blocks whose Cayley transforms rotate a layer's input"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    peft_names: ClassVar[dict[str, str]] = {"oft_block_size": "block_size"}

    targets: Targets = ("attn.q", "attn.v")
    layers: Layers = None
    block_size: int = setting(32, size=True)
    cayley_neumann: bool = True
    neumann_terms: int = setting(5, ge=1, le=64)

    def build(self) -> OFT:
        return OFT(self)


def nearest_divisor(n: int, b: int) -> int:
    """PEFT's adjust_oft_parameters: the divisor of n nearest to b (the lower one on a tie)."""
    if b >= n:
        return n
    high = b
    while high <= n and n % high:
        high += 1
    low = b
    while low > 1 and n % low:
        low -= 1
    return low if b - low <= high - b else high


def neumann_coefficients(terms: int) -> list[float]:
    """Coefficients of Q, Q², ... in PEFT's series: 2 each, the last 1 (terms 3 and 4 both reach Q³)."""
    if terms <= 2:
        return [2.0] * (terms - 1)
    return [2.0] * (max(terms - 1, 3) - 1) + [1.0]


class OFTUpdate(LinearUpdate):
    additive = False

    def __init__(self, in_features: int, block_size: int, neumann: bool, terms: int) -> None:
        super().__init__()
        self.block_size = b = nearest_divisor(in_features, block_size)
        self.weight = nn.Parameter(torch.zeros(in_features // b, b * (b - 1) // 2))
        self.neumann, self.terms = neumann, terms
        rows, cols = torch.triu_indices(b, b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self) -> torch.Tensor:
        """The blocks R_i, shaped (blocks, b, b)."""
        n, b = self.weight.shape[0], self.block_size
        q = self.weight.new_zeros(n, b, b)
        q[:, self.rows, self.cols] = self.weight
        q = q - q.transpose(-2, -1)
        eye = torch.eye(b, dtype=q.dtype, device=q.device).expand(n, b, b)
        if not self.neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        r, power = eye.clone(), eye
        for coef in neumann_coefficients(self.terms):
            power = power @ q
            r = r + coef * power
        return r

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rotations()
        blocks = x.to(r.dtype).reshape(*x.shape[:-1], r.shape[0], self.block_size)
        return torch.einsum("...rk,rkc->...rc", blocks, r).reshape(x.shape).to(x.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight @ torch.block_diag(*self.rotations()).T.to(weight.dtype)).to(weight.dtype)


class OFT(LinearDelta):
    config: OFTConfig

    def make_layer(self, name: str, module: nn.Module, in_features: int, out_features: int) -> OFTUpdate:
        cfg = self.config
        return OFTUpdate(in_features, cfg.block_size, cfg.cayley_neumann, cfg.neumann_terms)

    def hook(self, hooks: Hooks, module: nn.Module, layer: OFTUpdate) -> None:
        hooks.on_input(module, lambda mod, args, kwargs: map_first_input(args, kwargs, layer.rotate))
