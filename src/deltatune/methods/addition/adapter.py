"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): h -> h + s * up(act(down(h))).

The adapter rewrites the *output* of a sublayer's projection, i.e. before the residual add and
the LayerNorm of a post-LN block, which is where both papers insert it. An output hook does this
on every architecture without knowing how its block adds residuals.

`up` starts at zero (weight and bias), so the adapter is exactly the identity at init and training
starts from the pretrained function; `down` gets a small normal init so that `up` receives a
gradient at the first step. The nonlinearity makes the adapter impossible to fold into a weight,
hence not mergeable.

Placements: "houlsby" puts one adapter after the attention output projection and one after the FFN
output projection (`attn.o`, `ffn.out`); "pfeiffer" keeps only the FFN one, which the AdapterFusion
search found as good at half the cost. Explicit `targets` (e.g. adding `decoder:xattn.o` for the
cross-attention of an encoder-decoder) override the placement.

The bottleneck block itself (`methods/bottleneck.py`) is shared with the parallel adapter, Compacter and
the low-rank adapter; `placement_targets` and `check_placement` are reused by Compacter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ...core.delta import Delta, DeltaConfig, Hooks, safe_key, setting
from ...core.layers import hidden_size_of, map_hidden, param_dtype_device
from ...core.targeting import Layers, Targets
from ..bottleneck import Bottleneck, check_non_linearity

PLACEMENTS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attn.o", "ffn.out"),
    "pfeiffer": ("ffn.out",),
}


def check_placement(config: DeltaConfig, value: str) -> None:
    if value not in PLACEMENTS:
        raise ValueError(
            f"{type(config).__name__}.placement must be one of {', '.join(PLACEMENTS)} "
            f"(or set targets explicitly), got {value!r}"
        )


def placement_targets(placement: str, targets: Targets) -> Targets:
    """Explicit targets win; otherwise the placement's aliases."""
    return PLACEMENTS[placement] if targets is None else targets


@dataclasses.dataclass
class AdapterConfig(DeltaConfig):
    method: ClassVar[str] = "adapter"
    family: ClassVar[str] = "addition"
    trains: ClassVar[str] = "bottleneck MLPs (down, nonlinearity, up) added after sublayer outputs"
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True

    placement: str = "houlsby"
    targets: Targets = None
    layers: Layers = None
    bottleneck: int = setting(24, size=True, limit="width")
    non_linearity: str = "relu"
    scaling: float = setting(1.0, gt=0)

    def validate(self) -> None:
        super().validate()
        check_placement(self, self.placement)
        check_non_linearity(self, self.non_linearity)

    def build(self) -> Adapter:
        return Adapter(self)


class Adapter(Delta):
    config: AdapterConfig

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        self.adapters = nn.ModuleDict()

    def make_bottleneck(self, width: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
        cfg = self.config
        return Bottleneck(width, cfg.bottleneck, width, cfg.non_linearity, cfg.scaling, dtype, device)

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        for name in self.targets(model, placement_targets(cfg.placement, cfg.targets), cfg.layers):
            module = model.get_submodule(name)
            try:
                width = hidden_size_of(module)
            except TypeError as err:
                raise ValueError(
                    f"{cfg.method} target {name!r} is a {type(module).__name__} whose output width is unknown; "
                    "target sublayer output projections such as 'attn.o', 'ffn.out' or 'xattn.o'"
                ) from err
            dtype, device = param_dtype_device(module)
            block = self.make_bottleneck(width, dtype, device)
            self.adapters[safe_key(name)] = block
            self.sites[name] = sum(p.numel() for p in block.parameters())
            hooks.on_output(module, _sequential_hook(block))


def _sequential_hook(block: nn.Module):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return map_hidden(output, lambda h: h + block(h).to(h.dtype))

    return hook
