"""Norm adapter: a bottleneck that reads a norm's output and adds into that norm's input.

A norm `N` with input s (in a post-LN block, s = sublayer output + residual) computes

    N(s + s_ad * up(act(down(N(s)))))

instead of N(s): the adapter sees the normalised sublayer output and its update joins the sum the
norm normalises, and the norm runs twice with its own weights. This is AdapterHub's default
bottleneck adapter (`seq_bn`, Pfeiffer et al. 2020, "AdapterFusion": original_ln_before=True,
residual_before_ln=True, original_ln_after=True) on the norm that ends a post-LN block's FFN
(BERT's `layer.N.output.LayerNorm`); the Houlsby adapter (method `adapter`) reads the projection's
output before the norm instead, and the two are not the same function.

A forward pre-hook rewrites the norm's input; the inner N(s) calls the norm's own `forward` (its
current weights, no hooks), so any architecture's norm works. Default targets: every norm inside
a transformer block (the `ln` alias over `layers="0:"`; the embeddings' and final norms lie outside
the blocks); `deltatune.interop.import_adapterhub` names the exact norms of an AdapterHub adapter.

`up` starts at zero (weight and bias), so the delta is the identity at init; not mergeable
(nonlinear).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import Delta, DeltaConfig, Hooks, safe_key, setting
from ...core.layers import first_input, hidden_size_of, param_dtype_device
from ...core.targeting import Layers, Targets
from ..bottleneck import Bottleneck, check_non_linearity


@dataclasses.dataclass
class NormAdapterConfig(DeltaConfig):
    method: ClassVar[str] = "norm_adapter"
    family: ClassVar[str] = "addition"
    trains: ClassVar[str] = "bottleneck MLPs reading a norm's output, added to that norm's input (AdapterHub seq_bn)"
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("ln",)
    layers: Layers = "0:"
    bottleneck: int = setting(24, size=True, limit="width")
    non_linearity: str = "relu"
    scaling: float = setting(1.0, gt=0)

    def validate(self) -> None:
        super().validate()
        check_non_linearity(self, self.non_linearity)

    def build(self) -> NormAdapter:
        return NormAdapter(self)


class NormAdapter(Delta):
    config: NormAdapterConfig

    def __init__(self, config: NormAdapterConfig) -> None:
        super().__init__(config)
        self.adapters = nn.ModuleDict()

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        for name in self.targets(model, cfg.targets, cfg.layers):
            module = model.get_submodule(name)
            if not _is_norm(module):
                raise ValueError(
                    f"norm_adapter target {name!r} is a {type(module).__name__}, not a normalisation layer; "
                    "target norms such as 'ln' or a block's 'output.LayerNorm'"
                )
            width = hidden_size_of(module)
            dtype, device = param_dtype_device(module)
            block = Bottleneck(width, cfg.bottleneck, width, cfg.non_linearity, cfg.scaling, dtype, device)
            self.adapters[safe_key(name)] = block
            self.sites[name] = sum(p.numel() for p in block.parameters())
            hooks.on_input(module, _norm_input_hook(block))


def _is_norm(module: nn.Module) -> bool:
    """A module that normalises its last dimension: LayerNorm, RMSNorm and the models' own (T5LayerNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    weight = getattr(module, "weight", None)
    width = isinstance(weight, torch.Tensor) and weight.dim() == 1  # OLMo's has none: its normalized_shape
    return "norm" in type(module).__name__.lower() and (
        width or isinstance(getattr(module, "normalized_shape", None), tuple)
    )


def _norm_input_hook(block: nn.Module):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        s = first_input(args, kwargs)
        update = block(module.forward(s)).to(s.dtype)  # forward, not __call__: this hook must not run again
        if args:
            return (s + update, *args[1:]), kwargs
        key = next(k for k in ("input", "hidden_states", "x") if k in kwargs)
        return args, {**kwargs, key: s + update}

    return hook
