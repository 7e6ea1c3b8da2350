"""Compacter (Karimi Mahabadi et al. 2021): adapters whose down/up matrices are low-rank PHM layers.

Each projection W (in x out) is a sum of Kronecker products W = sum_{i=1..n} A_i ⊗ B_i, with
B_i = s_i t_i^T of rank `phm_rank`. The "slow" A_i (n x n each) are one tensor per direction
shared by every adapter of the model (the paper's shared_phm_rule), so they are held once by the
delta and counted once; only the tiny factors s_i, t_i and the biases are per site. This drops the
per-site cost from 2 d b to about n (d + b) r.

Init follows the reference implementation (rabeehk/compacter, OpenDelta): A ~ N(0, phm_init_range),
s, t Glorot-uniform with gain sqrt(2); except that the up projection's t starts at zero (and both
biases at zero), which makes the adapter exactly the identity at init like the other adapters.

Placement, targets and non-linearity behave as in `adapter.py`. Not mergeable (nonlinear).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import DeltaConfig, setting
from ...core.targeting import Layers, Targets
from ..bottleneck import Bottleneck, check_non_linearity
from .adapter import Adapter, check_placement


@dataclasses.dataclass
class CompacterConfig(DeltaConfig):
    method: ClassVar[str] = "compacter"
    family: ClassVar[str] = "addition"
    trains: ClassVar[str] = "adapters built from Kronecker products of shared n x n rules and rank-r factors"
    mergeable: ClassVar[bool] = False
    default_lr: ClassVar[float] = 3e-3
    identity_at_init: ClassVar[bool] = True

    placement: str = "houlsby"
    targets: Targets = None
    layers: Layers = None
    bottleneck: int = setting(24, size=True, limit="width")
    phm_dim: int = setting(4, size=True)
    phm_rank: int = setting(1, size=True)
    non_linearity: str = "gelu"
    scaling: float = setting(1.0, gt=0)
    phm_init_range: float = setting(1e-4, gt=0)

    def validate(self) -> None:
        super().validate()
        check_placement(self, self.placement)
        check_non_linearity(self, self.non_linearity)
        if self.bottleneck % self.phm_dim:
            raise ValueError(
                f"CompacterConfig.bottleneck ({self.bottleneck}) must be divisible by phm_dim ({self.phm_dim}); "
                f"pick a bottleneck that is a multiple of {self.phm_dim}"
            )

    def build(self) -> Compacter:
        return Compacter(self)


class PHMLinear(nn.Module):
    """x @ (sum_i A_i ⊗ s_i t_i) + bias, where the A_i come from the owning delta (shared, not registered here)."""

    def __init__(
        self,
        owner: Compacter,
        rule: str,
        in_dim: int,
        out_dim: int,
        zero_t: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        n, r = owner.config.phm_dim, owner.config.phm_rank
        object.__setattr__(self, "_owner", owner)  # a plain reference: the shared rule stays the delta's own
        self.rule = rule
        self.s = nn.Parameter(torch.empty(n, in_dim // n, r, dtype=dtype, device=device))
        self.t = nn.Parameter(torch.empty(n, r, out_dim // n, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_dim, dtype=dtype, device=device))
        with torch.no_grad():
            for i in range(n):
                nn.init.xavier_uniform_(self.s[i], gain=math.sqrt(2))
                nn.init.xavier_uniform_(self.t[i], gain=math.sqrt(2))
            if zero_t:
                self.t.zero_()

    def weight(self) -> torch.Tensor:
        """The (in, out) matrix sum_i kron(A_i, s_i t_i)."""
        a = getattr(self._owner, self.rule)
        b = self.s @ self.t  # (n, in/n, out/n)
        n, p, q = b.shape
        return torch.einsum("iab,ipq->apbq", a.to(b.dtype), b).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias


class Compacter(Adapter):
    config: CompacterConfig

    def __init__(self, config: CompacterConfig) -> None:
        super().__init__(config)
        n = config.phm_dim
        self.phm_rule_down = nn.Parameter(torch.randn(n, n, n) * config.phm_init_range)
        self.phm_rule_up = nn.Parameter(torch.randn(n, n, n) * config.phm_init_range)

    def make_bottleneck(self, width: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
        cfg = self.config
        if width % cfg.phm_dim:
            raise ValueError(
                f"Compacter: hidden size {width} is not divisible by phm_dim {cfg.phm_dim}; "
                "choose a phm_dim that divides it"
            )
        block = Bottleneck(width, cfg.bottleneck, width, cfg.non_linearity, cfg.scaling, dtype, device)
        block.down = PHMLinear(self, "phm_rule_down", width, cfg.bottleneck, False, dtype, device)
        block.up = PHMLinear(self, "phm_rule_up", cfg.bottleneck, width, True, dtype, device)
        return block
