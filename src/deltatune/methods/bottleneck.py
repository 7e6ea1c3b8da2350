"""The bottleneck block the adapter family shares: up(act(down(x))) * scaling.

The Houlsby/Pfeiffer adapter, the parallel adapter, Compacter (PHM projections) and the low-rank
adapter (rank-r projections) differ in where the block sits and how its two projections are built,
not in the block; it lives here once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..core.delta import DeltaConfig

NON_LINEARITIES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    # GELU's tanh approximation: transformers' "gelu_new", the default of OpenDelta's adapters
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
}
# "identity" makes the block linear, which only a method that can then merge it allows (the low-rank adapter)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {**NON_LINEARITIES, "identity": nn.Identity}


def check_non_linearity(config: DeltaConfig, value: str) -> None:
    if value not in NON_LINEARITIES:
        raise ValueError(
            f"{type(config).__name__}.non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {value!r}"
        )


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown non_linearity {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Bottleneck(nn.Module):
    """up(act(down(x))) * scaling, from width `in_dim` through `bottleneck` to width `out_dim`.

    Returns the update only; callers add it to whatever the adapter runs beside or after.
    """

    def __init__(
        self,
        in_dim: int,
        bottleneck: int,
        out_dim: int,
        non_linearity: str,
        scaling: float,
        dtype: torch.dtype,
        device: torch.device,
        down: nn.Module | None = None,
        up: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if down is not None and up is not None:  # factored projections (low-rank, PHM), initialised by their maker
            self.down, self.act, self.up = down, activation(non_linearity), up
            self.scaling = scaling
            return
        self.down: nn.Module = nn.Linear(in_dim, bottleneck, dtype=dtype, device=device)
        self.act = activation(non_linearity)
        self.up: nn.Module = nn.Linear(bottleneck, out_dim, dtype=dtype, device=device)
        self.scaling = scaling
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=1e-2)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.param_dtype())))) * self.scaling
