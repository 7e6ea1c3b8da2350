"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"; also the LN-only baseline of
Houlsby et al. 2019): train only the affine parameters of the normalisation layers.

Each norm's weight (gain) and bias, where present, is trained as W + D with D zero at init through a
parametrization. RMSNorm variants (Llama, T5) have a weight and no bias; only the weight is trained.
A target that is not itself a norm layer (`layer`, `encoder`) contributes the norm layers inside it,
so `targets=("layer",), layers="9:"` tunes the norms of the last layers.

Count: sum over the targeted norm layers of numel(weight) + numel(bias), bias where present.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ...core.delta import DeltaConfig, Hooks
from ...core.targeting import Layers, Targets, backbone_modules, in_head
from ._param_delta import ParamDelta, collect, is_norm


@dataclasses.dataclass
class LayerNormConfig(DeltaConfig):
    method: ClassVar[str] = "layernorm"
    family: ClassVar[str] = "specification"
    trains: ClassVar[str] = "deltas of the weight and bias of the normalisation layers"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("ln",)
    layers: Layers = None

    def build(self) -> LayerNormTuning:
        return LayerNormTuning(self)


class LayerNormTuning(ParamDelta):
    config: LayerNormConfig

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        selected = self.targets(model, cfg.targets, cfg.layers)
        modules = backbone_modules(model)
        chosen = set(selected)
        norms = {n for n, m in modules.items() if is_norm(m) and in_head(n, chosen)}
        if cfg.targets is not None:
            for name in selected:
                if not is_norm(modules[name]) and not any(in_head(n, {name}) for n in norms):
                    raise ValueError(
                        f"layernorm target {name!r} is a {type(modules[name]).__name__} with no normalisation "
                        "layer in it; target norm layers with 'ln' or their module names"
                    )
        refs = collect(model, sorted(norms), keep=lambda m, mod, p, t: m in norms and p in ("weight", "bias"))
        if not refs:
            raise ValueError(
                f"the targeted normalisation layers of {type(model).__name__} have no affine weight or bias "
                "(elementwise_affine=False); there is nothing for layernorm tuning to train"
            )
        self.claim_all(model, hooks, refs)
