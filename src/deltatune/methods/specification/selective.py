"""Selective (partial) fine-tuning: train every parameter of chosen modules, by default the last layer.

"Last-k layers" fine-tuning (e.g. Lee et al. 2019, "What would Elsa do? Freezing layers during
transformer fine-tuning") is the classic baseline of the specification family; any module set can be
chosen with `targets`. Each chosen parameter W is trained as W + D (D zero at init) through a
parametrization, so the backbone stays restorable and several deltas can share it.

Layer choice: `last_k` (default 1) keeps the last k numbered layers *of each stack*: an
encoder-decoder gets the last k encoder layers and the last k decoder layers even when the two stacks
differ in depth. `layers` (the usual "6-11", "9:", [0, 1], -1) takes precedence over `last_k` when
given; `last_k=None` and `layers=None` tune the targeted modules in every layer. Like `layers`,
`last_k` drops targeted modules outside numbered layers (embeddings, final norm).
`param_names` narrows to parameters by name (`("weight",)`, `("query.weight",)`).

Count: total numel of the distinct parameters of the selected modules (nested selections and tied
tensors counted once).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ...core.delta import DeltaConfig, Hooks, setting
from ...core.targeting import Layers, TargetError, Targets, backbone_modules, layer_index, side_of
from ._param_delta import ParamDelta, collect, name_filter


@dataclasses.dataclass
class SelectiveConfig(DeltaConfig):
    method: ClassVar[str] = "selective"
    family: ClassVar[str] = "specification"
    trains: ClassVar[str] = "deltas of every parameter of chosen modules (default: the last layer of each stack)"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    default_lr: ClassVar[float] = 1e-4
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("layer",)
    layers: Layers = None
    last_k: int | None = setting(1, ge=1)
    param_names: tuple[str, ...] | None = None

    def validate(self) -> None:
        super().validate()
        if self.last_k is not None and (not isinstance(self.last_k, int) or self.last_k <= 0):
            raise ValueError(f"SelectiveConfig.last_k must be a positive integer or None, got {self.last_k!r}")
        if self.param_names is not None:
            if isinstance(self.param_names, str) or not all(isinstance(n, str) and n for n in self.param_names):
                raise ValueError(
                    f"SelectiveConfig.param_names must be a tuple of parameter names such as ('weight',), "
                    f"got {self.param_names!r}"
                )

    def build(self) -> Selective:
        return Selective(self)


def last_layers(model: nn.Module, names: list[str], k: int) -> list[str]:
    """The names among `names` that lie in the last k numbered layers of their own stack."""
    depth: dict[str | None, int] = {}
    for name in backbone_modules(model):
        index = layer_index(name)
        if index is not None:
            side = side_of(name)
            depth[side] = max(depth.get(side, 0), index + 1)
    if not depth:
        raise TargetError(f"{type(model).__name__} has no numbered layers to take the last {k} from")
    short = {side or "model": n for side, n in depth.items() if n < k}
    if short:
        raise TargetError(f"last_k={k} but {', '.join(f'{s} has {n} layers' for s, n in short.items())}; lower last_k")
    kept = [n for n in names if (i := layer_index(n)) is not None and i >= depth[side_of(n)] - k]
    if not kept:
        raise TargetError(
            f"no targeted module lies in the last {k} layer(s); set last_k=None to tune the targeted modules "
            "wherever they are"
        )
    return kept


class Selective(ParamDelta):
    config: SelectiveConfig

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        selected = self.targets(model, cfg.targets, cfg.layers)
        if cfg.layers is None and cfg.last_k is not None:
            selected = last_layers(model, selected, cfg.last_k)
        refs = collect(model, selected, keep=name_filter(cfg.param_names))
        if not refs:
            what = f" named {', '.join(cfg.param_names)}" if cfg.param_names else ""
            raise ValueError(
                f"selective tuning found no parameters{what} in the targeted modules of {type(model).__name__}; "
                "widen targets or param_names"
            )
        self.claim_all(model, hooks, refs)
