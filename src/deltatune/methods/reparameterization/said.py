"""SAID, structure-aware intrinsic dimension (Aghajanyan et al. 2021; Li et al. 2018).

Every chosen parameter tensor W_i becomes W_i0 + lambda_i * P_i theta, where theta is ONE shared
d-dimensional vector and P_i a fixed Fastfood projection (core.fastfood): memory stays O(parameters)
instead of O(d x parameters). lambda_i (one scalar per tensor, "structure-aware") lets each tensor
take its own share of the update; it starts at 1 and theta at 0, so training starts at the backbone.
The projections are regenerated from `seed`: the saved delta is just d + (number of tensors) numbers.

Two choices follow the reference code of Aghajanyan et al. (a Fastfood per parameter tensor, as in Li et al.'s
PyTorch port), not the paper's equation, which writes one projection P of all D weights cut into blocks:
- each P_i is normalized on its own (|P_i theta| ~ |theta|), so a small tensor moves more per entry than a
  large one: on MiniLM-L6's query and value layers the biases (0.3% of the values) take about half of the
  update, where one P would give them 0.3%, and the update is sqrt(tensors) x |theta| long;
- `dim` is theta's size. Their code counts the lambdas inside d (theta has d - m entries), so a d90 measured
  here is comparable with theirs as dim + m (m = the number of tensors, 24 for query and value on MiniLM-L6).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...core.delta import Delta, DeltaConfig, Hooks, setting
from ...core.fastfood import Fastfood
from ...core.layers import refuse_quantized
from ...core.targeting import Layers, Targets


@dataclasses.dataclass
class SAIDConfig(DeltaConfig):
    method: ClassVar[str] = "said"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "a d-dim vector projected onto chosen weights by Fastfood (+1 scale per tensor)"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    default_lr: ClassVar[float] = 1e-2
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out")
    layers: Layers = None
    dim: int = setting(1000, size=True, le=1 << 24)
    param_names: tuple[str, ...] = ("weight", "bias")
    structured: bool = True
    seed: int = setting(0, ge=0)

    def validate(self) -> None:
        super().validate()
        if not self.param_names:
            raise ValueError("SAIDConfig.param_names is empty: name the parameters to project onto, e.g. ('weight',)")

    def build(self) -> SAID:
        return SAID(self)


class SAID(Delta):
    config: SAIDConfig

    def __init__(self, config: SAIDConfig) -> None:
        super().__init__(config)
        self.theta = nn.Parameter(torch.zeros(config.dim))
        self.scales = nn.Parameter(torch.zeros(0))
        self.projections = nn.ModuleList()
        self._params: list[tuple[str, str]] = []
        self._shapes: list[torch.Size] = []

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        chosen: list[tuple[str, str, torch.Tensor]] = []
        for name in self.targets(model, cfg.targets, cfg.layers):
            module = model.get_submodule(name)
            for pname in cfg.param_names:
                param = module._parameters.get(pname)
                if param is None and parametrize.is_parametrized(module, pname):  # another delta's, disabled
                    param = module.parametrizations[pname].original
                if param is not None:
                    refuse_quantized(f"{name}.{pname}", param)
                if param is not None and param.is_floating_point():
                    chosen.append((name, pname, param))
        if not chosen:
            raise ValueError(
                f"SAID found no parameters named {cfg.param_names} in its targets; check `targets` and `param_names`"
            )
        total = sum(param.numel() for _, _, param in chosen)
        if cfg.dim > total:  # a subspace larger than the space: more trainable numbers than the weights it moves
            raise ValueError(
                f"SAID dim={cfg.dim:,} exceeds the {total:,} values of the {len(chosen)} tensors it projects onto: an "
                f"intrinsic dimension is at most that; use dim <= {total:,} (or target more modules)"
            )
        device = chosen[0][2].device
        self.theta.data = self.theta.data.to(device)
        self.scales = nn.Parameter(torch.ones(len(chosen) if cfg.structured else 0, device=device))
        for i, (name, pname, param) in enumerate(chosen):
            proj = Fastfood(cfg.dim, param.numel(), seed=cfg.seed * 1_000_003 + i, device=device)
            self.projections.append(proj)
            self._params.append((name, pname))
            self._shapes.append(param.shape)
            self.sites[name] = self.sites.get(name, 0) + (1 if cfg.structured else 0)
            hooks.on_param(model.get_submodule(name), pname, lambda w, i=i: w + self.update(i).to(w.dtype), name)
        self.sites[chosen[0][0]] += cfg.dim  # theta is shared: shown once, at the first site

    def update(self, i: int) -> torch.Tensor:
        """The change to the i-th chosen tensor, in its shape."""
        proj = self.projections[i]
        flat = proj(self.theta)
        if self.config.structured:
            flat = flat * self.scales[i]
        return flat.view(self._shapes[i])

    def _fold(self, model: nn.Module, sign: float) -> None:
        for i, (name, pname) in enumerate(self._params):
            original = model.get_submodule(name).parametrizations[pname].original
            original.add_(sign * self.update(i).to(original.dtype))

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        self._fold(model, 1.0)

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        self._fold(model, -1.0)
