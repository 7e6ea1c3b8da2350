"""DoRA (Liu et al. 2024): weight-decomposed LoRA, W' = m * (W + s·BA) / ||W + s·BA||_row.

The magnitude m (one entry per output feature) starts at ||W||_row, and B at zero, so training starts
at the backbone. As the paper (section 4.3) and PEFT do, the norm is treated as a constant in the
backward pass. With g = m / ||W + s·BA|| the layer computes g * (W x + s·BA x) + b, which is the
frozen output rescaled plus the rescaled LoRA update: no weight-sized tensor enters the graph except
the norm (computed without gradient). Merging writes g * (W + s·BA) into W; unmerging restores W.
With dropout > 0 only the LoRA path sees dropped inputs (PEFT recomputes W x from them instead).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ._linear_delta import LinearDelta, LinearUpdate, dense_weight
from .lora import LoRAConfig, LoRALayer, check_patterns


@dataclasses.dataclass
class DoRAConfig(LoRAConfig):
    method: ClassVar[str] = "dora"
    trains: ClassVar[str] = "a magnitude per output feature and LoRA factors on the weight's direction"
    merge_adds: ClassVar[bool] = False  # its norm of the whole weight changes with what else is merged there

    def build(self) -> DoRA:
        return DoRA(self)


class DoRAUpdate(LinearUpdate):
    additive = False

    def __init__(self, weight: torch.Tensor, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        self.lora = LoRALayer(in_f, out_f, r, alpha, dropout, weight.dtype, weight.device)
        self.magnitude = nn.Parameter(torch.linalg.norm(weight.detach(), dim=1))

    def gain(self, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + s·BA||_row, the norm without gradient (DoRA section 4.3)."""
        with torch.no_grad():
            norm = torch.linalg.norm(weight + self.lora.weight_delta().to(weight.dtype), dim=1)
        return self.magnitude / norm.to(self.magnitude.dtype)

    def apply(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        g = self.gain(dense_weight(module))
        bias = getattr(module, "bias", None)
        base = output if bias is None else output - bias
        return output + ((g - 1) * base + g * self.lora.update(x)).to(output.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        new = self.gain(weight).unsqueeze(1) * (weight + self.lora.weight_delta().to(weight.dtype))
        return new.to(weight.dtype)


class DoRA(LinearDelta):
    config: DoRAConfig

    def linear_targets(self, model: nn.Module) -> list[str]:
        return check_patterns(self.config, list(super().linear_targets(model)))

    def make_layer(self, name: str, module: nn.Module, in_features: int, out_features: int) -> DoRAUpdate:
        r, alpha = self.config.rank_alpha(name)
        return DoRAUpdate(dense_weight(module), r, alpha, self.config.dropout)
