"""Diff pruning (Guo et al. 2021): a task-specific diff on chosen weights, trained to be sparse.

Each chosen parameter W becomes W + diff (diff zero at init) through a parametrization.
`mode="l0"` follows the paper: diff = d * z with per-element hard-concrete gates z (Louizos et al.
2018) whose expected L0 norm, `l0_penalty()`, the training loop adds as `l0_lambda * penalty`. Gates
are sampled in training mode and deterministic in eval mode; since d starts at zero the output equals
the backbone's at init either way. The stretch (-1.5, 1.5), temperature 1, log_alpha init 5 and
lambda 1.25e-7 are the defaults of the authors' code; Louizos et al.'s (-0.1, 1.1), 2/3 can be set.
`mode="magnitude"` trains a dense diff.

`prune()` ends either mode as the paper does: the gates are folded into d (log_alpha is dropped, the
delta then holds only the diff, and its config says mode="magnitude"), and the diff is projected
onto the target sparsity by keeping the top (1 - sparsity) fraction of entries by magnitude over all
chosen tensors together. The mask is then fixed: the backbone sees diff * mask, so further training
cannot revive pruned entries, and the saved diff is masked too. The mask is re-derivable as diff != 0.

Count: total numel of the chosen parameters for the diff, the same again for log_alpha in l0 mode
(2x before prune, 1x after).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import DeltaConfig, Hooks, safe_key, setting
from ...core.targeting import Layers, Targets
from ._param_delta import ParamDelta, collect, name_filter

MODES = ("l0", "magnitude")


@dataclasses.dataclass
class DiffPruningConfig(DeltaConfig):
    method: ClassVar[str] = "diff_pruning"
    family: ClassVar[str] = "specification"
    trains: ClassVar[str] = "a sparse diff on chosen weights (hard-concrete L0 gates or magnitude pruning)"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    default_lr: ClassVar[float] = 5e-4
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out")
    layers: Layers = None
    param_names: tuple[str, ...] | None = None
    mode: str = "l0"
    sparsity: float = 0.995
    l0_lambda: float = setting(1.25e-7, ge=0)
    temperature: float = setting(1.0, gt=0)
    stretch: tuple[float, float] = (-1.5, 1.5)
    log_alpha_init: float = 5.0

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.mode not in MODES:
            raise ValueError(f"{name}.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.sparsity, int | float) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"{name}.sparsity is the fraction of diff entries pruned to zero and must be in [0, 1), "
                f"got {self.sparsity!r} (the paper keeps 0.5%: sparsity=0.995)"
            )
        if self.l0_lambda < 0:
            raise ValueError(f"{name}.l0_lambda must be >= 0, got {self.l0_lambda}")
        if self.temperature <= 0:
            raise ValueError(f"{name}.temperature must be > 0, got {self.temperature}")
        low, high = self.stretch
        if not (low < 0 and high > 1):
            raise ValueError(
                f"{name}.stretch must be (l, r) with l < 0 and r > 1 so gates reach exactly 0 and 1, got {self.stretch}"
            )

    def build(self) -> DiffPruning:
        return DiffPruning(self)


class _Masks(nn.Module):
    """Holds the fixed masks as non-persistent buffers: they move with the delta but are not saved."""


class DiffPruning(ParamDelta):
    config: DiffPruningConfig

    def __init__(self, config: DiffPruningConfig) -> None:
        super().__init__(config)
        self.log_alpha = nn.ParameterDict()
        self.masks = _Masks()
        self.mode = config.mode
        self.register_state_dict_post_hook(_save_masked)

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        selected = self.targets(model, cfg.targets, cfg.layers)
        refs = collect(model, selected, keep=name_filter(cfg.param_names))
        if not refs:
            raise ValueError(
                f"diff pruning found no parameters in the targeted modules of {type(model).__name__}; "
                "widen targets or param_names"
            )
        for ref in refs:
            if self.mode == "l0":  # gates exist before the parametrization that reads them
                init = torch.full(ref.shape, float(cfg.log_alpha_init), dtype=ref.dtype, device=ref.device)
                self.log_alpha[safe_key(ref.name)] = nn.Parameter(init)
                self.sites[ref.module] = self.sites.get(ref.module, 0) + ref.numel
            self.claim(model, hooks, ref)

    # -- gates ---------------------------------------------------------------------------------
    def _stretched(self, s: torch.Tensor) -> torch.Tensor:
        low, high = self.config.stretch
        return (s * (high - low) + low).clamp(0.0, 1.0)

    def gate(self, key: str, sample: bool) -> torch.Tensor:
        """Hard-concrete gate: a sample (training) or its deterministic test-time value."""
        log_alpha = self.log_alpha[key]
        if not sample:
            return self._stretched(torch.sigmoid(log_alpha))
        u = torch.rand_like(log_alpha).clamp(1e-6, 1.0 - 1e-6)
        return self._stretched(torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / self.config.temperature))

    def l0_penalty(self) -> torch.Tensor:
        """Expected number of non-zero gates; the training loss adds `config.l0_lambda` times this."""
        if self.mode != "l0":
            return self.delta[next(iter(self.delta))].new_zeros(())
        low, high = self.config.stretch
        shift = self.config.temperature * math.log(-low / high)
        return sum(torch.sigmoid(a - shift).sum() for a in self.log_alpha.values())

    def has_loss_term(self) -> bool:
        return self.mode == "l0" and bool(self.config.l0_lambda)

    def regularization(self) -> torch.Tensor:
        """The term a training loop adds to the task loss: `l0_lambda * l0_penalty()`."""
        return self.config.l0_lambda * self.l0_penalty()

    def effective(self, key: str) -> torch.Tensor:
        diff = self.delta[key]
        if self.mode == "l0":
            return diff * self.gate(key, sample=self.training)
        mask = getattr(self.masks, key, None)
        return diff if mask is None else diff * mask

    def merge_value(self, key: str) -> torch.Tensor:
        diff = self.delta[key]
        if self.mode == "l0":
            return diff * self.gate(key, sample=False)
        return self.effective(key)

    # -- sparsity ------------------------------------------------------------------------------
    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of zeros: of the deterministic gates in l0 mode, of the diff itself otherwise."""
        if self.mode == "l0":
            tensors = [self.gate(k, sample=False) for k in self.delta]
        else:
            tensors = [self.effective(k) for k in self.delta]
        total = sum(t.numel() for t in tensors)
        return sum(int((t == 0).sum()) for t in tensors) / total

    def finalize(self) -> None:
        """At the end of training the diff is pruned to its target sparsity: that is what gets saved."""
        self.prune()

    @torch.no_grad()
    def prune(self) -> None:
        """Fold the gates into the diff, keep its top (1 - sparsity) entries by magnitude, fix the mask."""
        if self.mode == "l0":
            for key, diff in self.delta.items():
                diff.mul_(self.gate(key, sample=False))
            self.log_alpha = nn.ParameterDict()
            for ref in self._refs.values():
                self.sites[ref.module] -= ref.numel
            self.mode = "magnitude"
            self.finalized["mode"] = "magnitude"
        values = {key: self.effective(key).detach() for key in self.delta}
        flat = torch.cat([v.abs().flatten().float() for v in values.values()])
        keep = round((1.0 - self.config.sparsity) * flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        if keep > 0:
            chosen[torch.topk(flat, keep, sorted=False).indices] = True
        offset = 0
        for key, value in values.items():
            mask = chosen[offset : offset + value.numel()].view_as(value)
            offset += value.numel()
            self.delta[key].copy_(value * mask)
            self.masks.register_buffer(key, mask, persistent=False)


def _save_masked(module: DiffPruning, state: dict, prefix: str, local_metadata: dict) -> None:
    """Saved diffs are the masked ones, whatever an optimizer's momentum did to pruned raw entries."""
    for key in module.delta:
        mask = getattr(module.masks, key, None)
        name = f"{prefix}delta.{key}"
        if mask is not None and name in state:
            state[name] = state[name] * mask
