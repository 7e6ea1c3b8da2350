"""The Fastfood transform (Le et al. 2013): a structured random projection R^d -> R^D in O(D log D).

Intrinsic-dimension methods (Li et al. 2018; Aghajanyan et al. 2021, SAID) map a d-dimensional
vector onto D model parameters. A dense Gaussian D x d matrix would need d times the model's
memory; Fastfood stores three length-L vectors and a permutation (L = the next power of two
>= max(d, D)) and computes  P x = (H G Pi H B pad(x))[:D] / (sqrt(L * |G|^2) * sqrt(D / L)),
normalized so that |P x| ~ |x| for every d.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dimension (a power of two), autograd-friendly."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


class Fastfood(nn.Module):
    """A fixed random projection from `d` to `D` numbers, regenerated from `seed` (never saved)."""

    def __init__(self, d: int, D: int, seed: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.d, self.D = d, D
        self.L = 1 << max(1, math.ceil(math.log2(max(d, D))))
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", (torch.randint(0, 2, (self.L,), generator=g) * 2 - 1).float(), persistent=False)
        self.register_buffer("Pi", torch.randperm(self.L, generator=g), persistent=False)
        gauss = torch.randn(self.L, generator=g)
        self.register_buffer("G", gauss, persistent=False)
        self.scale = 1.0 / (math.sqrt(self.L * float(gauss.pow(2).sum())) * math.sqrt(D / self.L))
        if device is not None:
            self.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x.to(self.G.dtype), (0, self.L - self.d))
        y = fwht(self.B * padded)
        y = fwht(y[..., self.Pi] * self.G)
        return y[..., : self.D] * self.scale
