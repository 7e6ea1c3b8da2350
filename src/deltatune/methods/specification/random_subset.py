"""Random-subset tuning (Su et al. 2023, "Arbitrary Few Parameters are Good Enough for Adapting
Large-scale Pre-trained Language Models"): train `count` entries of the chosen weights picked
uniformly at random, and nothing else.

The choice is one seeded permutation over all chosen tensors laid end to end (in model order), so it
is regenerated from `seed` and never stored: the saved delta is the `count` trained values. Each
chosen tensor W computes as W + scatter(values) through a parametrization (zero at init, so training
starts at the backbone); merging adds the values into W at their places, unmerging subtracts them.
The permutation costs 8 bytes per candidate entry, once, at attach.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import Delta, DeltaConfig, DeltaError, Hooks, setting
from ...core.targeting import Layers, Targets
from ._param_delta import ParamRef, collect, name_filter


@dataclasses.dataclass
class RandomSubsetConfig(DeltaConfig):
    method: ClassVar[str] = "random_subset"
    family: ClassVar[str] = "specification"
    trains: ClassVar[str] = "a seeded random choice of entries of chosen weights (the choice is not stored)"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out")
    layers: Layers = None
    param_names: tuple[str, ...] | None = None
    count: int = setting(10_000, size=True, le=1 << 30)
    seed: int = setting(0, ge=0)

    def build(self) -> RandomSubset:
        return RandomSubset(self)


class _Indices(nn.Module):
    """The chosen flat indices per tensor, as non-persistent buffers: they move with the delta, unsaved."""


class RandomSubset(Delta):
    config: RandomSubsetConfig

    def __init__(self, config: RandomSubsetConfig) -> None:
        super().__init__(config)
        self.values = nn.Parameter(torch.zeros(config.count))
        self.indices = _Indices()
        self._spans: dict[str, tuple[ParamRef, int, int]] = {}  # key -> (tensor, start, end) in `values`

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        refs = [r for r in collect(model, self.targets(model, cfg.targets, cfg.layers), name_filter(cfg.param_names))
                if r.dtype.is_floating_point]  # fmt: skip
        total = sum(r.numel for r in refs)
        if cfg.count > total:
            raise ValueError(
                f"RandomSubsetConfig.count is {cfg.count:,} but the targeted tensors hold only {total:,} entries; "
                "lower count or widen targets/param_names"
            )
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        chosen = torch.randperm(total, generator=g)[: cfg.count].sort().values
        device = refs[0].device
        self.values.data = self.values.data.to(device=device, dtype=refs[0].dtype)
        offset, start = 0, 0
        for i, ref in enumerate(refs):
            end = int(torch.searchsorted(chosen, offset + ref.numel))
            if end > start:
                key = f"t{i}"
                self.indices.register_buffer(key, (chosen[start:end] - offset).to(device), persistent=False)
                self._spans[key] = (ref, start, end)
                self.sites[ref.module] = self.sites.get(ref.module, 0) + end - start
                for mname, pname in ref.owners:
                    try:
                        hooks.on_param(model.get_submodule(mname), pname, self._param_fn(key), mname)
                    except DeltaError as err:
                        raise DeltaError(f"random_subset cannot claim {mname}.{pname}: {err}") from err
            offset, start = offset + ref.numel, end

    def _param_fn(self, key: str):  # noqa: ANN202
        def fn(weight: torch.Tensor) -> torch.Tensor:
            return self._added(key, weight)

        return fn

    def _added(self, key: str, weight: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        _, start, end = self._spans[key]
        values = self.values[start:end].to(weight.dtype)
        return weight.flatten().index_add(0, getattr(self.indices, key), values, alpha=sign).view_as(weight)

    def _fold(self, model: nn.Module, sign: float) -> None:
        for key, (ref, _, _) in self._spans.items():
            module = model.get_submodule(ref.module)
            original = module.parametrizations[ref.param].original
            original.copy_(self._added(key, original, sign))

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        self._fold(model, 1.0)

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        self._fold(model, -1.0)
