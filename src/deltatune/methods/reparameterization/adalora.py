"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, dW = P diag(λ) Q · alpha / r, whose rank budget is
moved during training to the layers and singular values that matter.

P (out, r) and Q (r, in) start N(0, 0.02), λ at zero (training starts at the backbone); their loss
gets `orth_weight` times the mean ||PᵀP - I||, ||QQᵀ - I|| (Frobenius) so they stay near-orthogonal.
After every optimizer step `fit` calls `on_step`: the importance of each triplet (λ_i, P_i, Q_i) is
|w · grad| smoothed (beta1) times its uncertainty (beta2), and the total rank budget falls cubically
from init_r to target_r per layer between `tinit` and `tfinal` steps from the end; the least important
λ_i are set to zero. This is PEFT's RankAllocator with PEFT's defaults; the saved λ carries the ranks.
Outside `fit`, call `delta.on_step(step, total_steps)` after each optimizer step, before zero_grad.
`finalize()` holds the final budget when training stopped before the last allocation (patience, or a
best state from earlier), and `schedule_state()` lets a resumed `fit` continue the importance averages.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.delta import DeltaConfig, setting
from ...core.targeting import Layers, Targets
from ._linear_delta import LinearDelta, LinearUpdate

UNSCHEDULED_WARNING = 100
UNSCHEDULED_MESSAGE = (
    "AdaLoRA has trained 100 forwards without on_step: its rank allocation is not running (the delta stays "
    "at init_r). Under transformers.Trainer add callbacks=[deltatune.train.hf.DeltaScheduleCallback()]; "
    "in your own loop call delta.on_step(step, total_steps) after each optimizer step"
)


@dataclasses.dataclass
class AdaLoRAConfig(DeltaConfig):
    method: ClassVar[str] = "adalora"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "SVD-form updates P·diag(λ)·Q whose ranks are allocated by importance during training"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True
    peft_names: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout", "r": "init_r"}

    targets: Targets = ("attn.q", "attn.v")
    layers: Layers = None
    init_r: int = setting(12, size=True, limit="width")
    target_r: int | None = setting(None, ge=0)  # None: PEFT's 8 of 12, i.e. round(2/3 of init_r)
    alpha: float = setting(8.0, gt=0)
    dropout: float = setting(0.0, ge=0, lt=1)
    tinit: int = setting(0, ge=0)
    tfinal: int = setting(0, ge=0)
    delta_t: int = setting(1, ge=1)
    beta1: float = setting(0.85, gt=0, lt=1)
    beta2: float = setting(0.85, gt=0, lt=1)
    orth_weight: float = setting(0.5, ge=0)

    def validate(self) -> None:
        super().validate()
        if self.target_r is not None and self.target_r > self.init_r:
            raise ValueError(f"AdaLoRAConfig.target_r ({self.target_r}) must not exceed init_r ({self.init_r})")

    @property
    def final_r(self) -> int:
        """The average rank per layer at the end of training."""
        return round(self.init_r * 2 / 3) if self.target_r is None else self.target_r

    def build(self) -> AdaLoRA:
        return AdaLoRA(self)


class AdaLoRAUpdate(LinearUpdate):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(r, in_features) * 0.02)  # Q
        self.B = nn.Parameter(torch.randn(out_features, r) * 0.02)  # P
        self.E = nn.Parameter(torch.zeros(r, 1))  # λ
        self.scaling = alpha / (r + 1e-5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x.to(self.A.dtype)), self.A * self.E), self.B) * self.scaling

    def weight_delta(self) -> torch.Tensor:
        return self.B @ (self.A * self.E) * self.scaling


class AdaLoRA(LinearDelta):
    config: AdaLoRAConfig

    def __init__(self, config: AdaLoRAConfig) -> None:
        super().__init__(config)
        self._ema: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (importance, uncertainty)
        self._final: dict[str, torch.Tensor] | None = None
        self._unscheduled = 0  # training forwards since the last on_step: many means no loop calls it

    def make_layer(self, name: str, module: nn.Module, in_features: int, out_features: int) -> AdaLoRAUpdate:
        cfg = self.config
        return AdaLoRAUpdate(in_features, out_features, cfg.init_r, cfg.alpha, cfg.dropout)

    def has_loss_term(self) -> bool:
        return bool(self.config.orth_weight)

    def regularization(self) -> torch.Tensor | None:
        """orth_weight times the mean distance of each PᵀP and QQᵀ from the identity."""
        self._unscheduled += 1
        if self._unscheduled == UNSCHEDULED_WARNING:
            warnings.warn(UNSCHEDULED_MESSAGE, stacklevel=2)
        if not self.config.orth_weight or not self.training:
            return None
        terms = []
        for layer in self.layers.values():
            for cov in (layer.A @ layer.A.T, layer.B.T @ layer.B):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), dtype=cov.dtype, device=cov.device)))
        return self.config.orth_weight * torch.stack(terms).mean()

    def budget(self, step: int, total: int) -> tuple[int, bool]:
        """(total rank kept, whether to mask at this step): PEFT's cubic schedule."""
        cfg, n = self.config, len(self.layers)
        if step <= cfg.tinit:
            return cfg.init_r * n, False
        if step > total - cfg.tfinal:
            return cfg.final_r * n, True
        left = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
        return int((cfg.init_r - cfg.final_r) * n * left**3 + cfg.final_r * n), step % cfg.delta_t == 0

    @torch.no_grad()
    def on_step(self, step: int, total: int) -> None:
        cfg, self._unscheduled = self.config, 0
        if cfg.tinit + cfg.tfinal >= total:
            raise ValueError(
                f"AdaLoRA needs tinit + tfinal ({cfg.tinit} + {cfg.tfinal}) below the {total} training steps"
            )
        if step > total - cfg.tfinal:  # the final ranks are fixed: keep the pruned λ at zero
            if self._final is None:  # resumed inside the final phase: the saved zeros are the mask
                self._final = {key: layer.E != 0 for key, layer in self.layers.items()}
            for key, layer in self.layers.items():
                layer.E.masked_fill_(~self._final[key], 0.0)
            return
        if step < total - cfg.tfinal:
            self._update_importance()
        budget, mask = self.budget(step, total)
        if mask or step == total - cfg.tfinal:
            kept = self._mask_to(budget)
            if step == total - cfg.tfinal:
                self._final, self._ema = kept, {}

    def schedule_state(self) -> dict[str, torch.Tensor]:
        """The importance averages (per parameter name) and, past the last allocation, the kept masks."""
        names = {id(p): n for n, p in self.named_parameters()}
        state = {
            f"ema.{names[i]}.{part}": t
            for i, pair in self._ema.items()
            for part, t in zip(("avg", "unc"), pair, strict=True)
        }
        return state | {f"final.{key}": kept for key, kept in (self._final or {}).items()}

    def load_schedule_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        self._ema = {
            id(params[key[4:-4]]): (state[key], state[key[:-4] + ".unc"]) for key in state if key.endswith(".avg")
        }
        final = {key[6:]: kept.bool() for key, kept in state.items() if key.startswith("final.")}
        self._final = final or None

    @torch.no_grad()
    def finalize(self) -> None:
        """Hold the final budget: training that stopped early (patience, or the best state restored from
        before the last allocation) can end with more rank than `target_r`; the least important
        triplets (by the importance averages, else by |λ|) are pruned down to it."""
        budget = self.config.final_r * len(self.layers)
        if sum(self.ranks().values()) <= budget:
            return
        scores = {}
        for key, layer in self.layers.items():
            score = self._score(layer.E).view(-1) if self._ema else layer.E.abs().view(-1).float()
            scores[key] = score.masked_fill(layer.E.view(-1) == 0, -torch.inf)  # pruned stay pruned
        order = torch.cat(list(scores.values())).argsort(descending=True, stable=True)
        keep = torch.zeros_like(order, dtype=torch.bool)
        keep[order[:budget]] = True
        for key, kept in zip(scores, keep.split([len(v) for v in scores.values()]), strict=True):
            self.layers[key].E.masked_fill_(~kept.view(-1, 1), 0.0)
        self._ema = {}

    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for p in self.parameters():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg, unc = self._ema.get(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
            avg = b1 * avg + (1 - b1) * ipt
            self._ema[id(p)] = (avg, b2 * unc + (1 - b2) * (ipt - avg).abs())

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        avg, unc = self._ema.get(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
        return avg * unc

    def _mask_to(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero the λ of the lowest-scoring triplets so that `budget` remain; returns the kept masks (r, 1)."""
        scores = {
            key: self._score(layer.E).view(-1) + self._score(layer.A).mean(1) + self._score(layer.B).mean(0)
            for key, layer in self.layers.items()
        }
        k = self.config.init_r * len(self.layers) - budget
        if k <= 0:
            return {key: torch.ones_like(layer.E, dtype=torch.bool) for key, layer in self.layers.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
        kept = {}
        for key, layer in self.layers.items():
            kept[key] = (scores[key] > threshold).view(-1, 1)
            layer.E.masked_fill_(~kept[key], 0.0)
        return kept

    def ranks(self) -> dict[str, int]:
        """Each targeted module's current rank: its non-zero λ."""
        return {self._names[k]: int((layer.E != 0).sum()) for k, layer in self.layers.items()}
