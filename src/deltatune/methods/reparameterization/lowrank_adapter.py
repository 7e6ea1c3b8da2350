"""Low-rank adapter (Karimi Mahabadi et al. 2021, the "Low-Rank Adapter" baseline of Compacter).

A bottleneck adapter h -> h + up(act(down(h))) whose down and up matrices are themselves products
of rank-r factors, so a site costs r * (d + b) * 2 + b + d parameters instead of 2 * d * b + b + d.
It is a reparameterization of the adapter's weights, hence its family. With `non_linearity="identity"`
the whole adapter is the linear map (I + U D) applied to the targeted layer's output, which folds into
that layer's weight and bias: then (and only then) it can be merged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import Delta, DeltaConfig, DeltaError, Hooks, safe_key, setting
from ...core.layers import delta_dtype, is_linear, is_transposed, linear_dims, map_hidden, stored_weight
from ...core.targeting import Layers, Targets
from ..bottleneck import ACTIVATIONS, Bottleneck


@dataclasses.dataclass
class LowRankAdapterConfig(DeltaConfig):
    method: ClassVar[str] = "lowrank_adapter"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "rank-r factors of a bottleneck adapter's down and up matrices"
    mergeable: ClassVar[bool] = True  # only with non_linearity="identity" (can_merge); merge() says so otherwise
    merge_requires: ClassVar[str] = "non_linearity=identity"
    default_lr: ClassVar[float] = 3e-3
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("attn.o", "ffn.out")
    layers: Layers = None
    bottleneck: int = setting(24, size=True, limit="width")
    rank: int = setting(1, size=True)
    non_linearity: str = "gelu"

    def validate(self) -> None:
        super().validate()
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(
                f"LowRankAdapterConfig.non_linearity must be one of {', '.join(ACTIVATIONS)}, got {self.non_linearity!r}"
            )
        if self.rank > self.bottleneck:
            raise ValueError(f"LowRankAdapterConfig.rank ({self.rank}) cannot exceed bottleneck ({self.bottleneck})")

    @property
    def can_merge(self) -> bool:
        return self.non_linearity == "identity"

    def build(self) -> LowRankAdapter:
        return LowRankAdapter(self)


class LowRankLinear(nn.Module):
    """y = x (S T)^T + b with S (out, r) and T (r, in): a full matrix never exists during training."""

    def __init__(self, in_f: int, out_f: int, rank: int, zero: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.S = nn.Parameter(torch.empty(out_f, rank, dtype=dtype, device=device))
        self.T = nn.Parameter(torch.empty(rank, in_f, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_f, dtype=dtype, device=device))
        nn.init.normal_(self.T, std=1.0 / in_f**0.5)
        if zero:  # the up-projection starts at zero so the adapter starts as the identity
            nn.init.zeros_(self.S)
        else:
            nn.init.normal_(self.S, std=1.0 / rank**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.T.T) @ self.S.T + self.bias

    def matrix(self) -> torch.Tensor:
        return self.S @ self.T


class LowRankBottleneck(Bottleneck):
    """The adapters' bottleneck with rank-r projections, plus the residual: h -> h + up(act(down(h)))."""

    def __init__(self, width: int, cfg: LowRankAdapterConfig, dtype: torch.dtype, device: torch.device) -> None:
        down = LowRankLinear(width, cfg.bottleneck, cfg.rank, False, dtype, device)
        up = LowRankLinear(cfg.bottleneck, width, cfg.rank, True, dtype, device)
        super().__init__(width, cfg.bottleneck, width, cfg.non_linearity, 1.0, dtype, device, down=down, up=up)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + super().forward(h).to(h.dtype)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, c) with adapter(h) = (I + M) h + c, valid only for the identity non-linearity."""
        up, down = self.up.matrix(), self.down.matrix()
        return up @ down, up @ self.down.bias + self.up.bias


class LowRankAdapter(Delta):
    config: LowRankAdapterConfig

    def __init__(self, config: LowRankAdapterConfig) -> None:
        super().__init__(config)
        self.adapters = nn.ModuleDict()
        self._names: dict[str, str] = {}

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        for name in self.targets(model, self.config.targets, self.config.layers):
            module = model.get_submodule(name)
            if not is_linear(module):
                raise ValueError(
                    f"low-rank adapter target {name!r} is a {type(module).__name__}; target the output projection "
                    "of a sublayer (a linear layer), e.g. 'attn.o' or 'ffn.out'"
                )
            adapter = LowRankBottleneck(linear_dims(module)[1], self.config, delta_dtype(module), module.weight.device)
            key = safe_key(name)
            self.adapters[key] = adapter
            self._names[key] = name
            self.sites[name] = sum(p.numel() for p in adapter.parameters())
            hooks.on_output(module, lambda mod, args, kwargs, out, a=adapter: map_hidden(out, a))

    def _linear_check(self, model: nn.Module) -> None:
        if self.config.non_linearity != "identity":
            raise DeltaError(
                f"a low-rank adapter with non_linearity={self.config.non_linearity!r} is not a weight change and "
                "cannot be merged; train it with non_linearity='identity' to make it mergeable"
            )
        for key, name in self._names.items():
            module = model.get_submodule(name)
            if module.bias is None and self.adapters[key].affine()[1].abs().max() > 0:
                raise DeltaError(f"{name!r} has no bias to absorb the adapter's bias; this delta cannot be merged")

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        self._linear_check(model)
        for key, name in self._names.items():
            self._fold(model.get_submodule(name), *self.adapters[key].affine(), invert=False)

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        for key, name in self._names.items():
            self._fold(model.get_submodule(name), *self.adapters[key].affine(), invert=True)

    @staticmethod
    def _fold(module: nn.Module, m: torch.Tensor, c: torch.Tensor, invert: bool) -> None:
        """W' = (I + M) W, b' = (I + M) b + c; unmerging solves (I + M) W = W' in float64."""
        eye = torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
        a = eye + m.double()
        transposed = is_transposed(module)  # Conv1D stores (in, out)
        weight = stored_weight(module)  # under another delta's parametrization: its original
        bias = stored_weight(module, "bias") if module.bias is not None else None
        w = weight.double().T if transposed else weight.double()
        b = bias.double() if bias is not None else None
        if invert:
            w_new = torch.linalg.solve(a, w)
            b_new = torch.linalg.solve(a, (b - c.double()).unsqueeze(-1)).squeeze(-1) if b is not None else None
        else:
            w_new = a @ w
            b_new = a @ b + c.double() if b is not None else None
        w_new = w_new.T if transposed else w_new
        weight.copy_(w_new.to(weight.dtype))
        if b_new is not None and bias is not None:
            bias.copy_(b_new.to(bias.dtype))
