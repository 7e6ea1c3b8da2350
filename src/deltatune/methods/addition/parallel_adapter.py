"""Parallel adapter (He et al. 2022, "Towards a unified view of parameter-efficient transfer learning").

The adapter runs *beside* the FFN instead of after it: out = FFN(x) + s * up(act(down(x))), with x the
FFN's input. The paper found this placement (with s = 4) the best adapter variant.

Rule used on every architecture, because no single module is "the FFN" everywhere (BERT splits it
into `intermediate` and `output`, Llama gates it): the input x is read from the module(s) named by
`input_from` (default `ffn.in`, the first FFN projection; a forward pre-hook caches its input) and the
update is added to the output of the module named by `targets` (default `ffn.out`, the last FFN
projection) of the *same transformer block*. Blocks are paired by their qualified name up to the
layer number (`...layer.3`, `decoder.block.1`). Where `input_from` matches several modules of one
block (Llama's `gate_proj` and `up_proj`, T5's gated `wi_0`/`wi_1`) they share their input, so only
the first is hooked. A target whose block has no such module is an error, not a silent skip.

Widths: the adapter reads in_features of the input module and writes out_features of the target.
`up` is zero at init, so the model starts exactly as the backbone. Not mergeable (nonlinear).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ...core.delta import Delta, DeltaConfig, Hooks, safe_key, setting
from ...core.layers import first_input, linear_dims, linear_target, param_dtype_device
from ...core.targeting import Layers, Targets, block_of, resolve
from ..bottleneck import Bottleneck, check_non_linearity


@dataclasses.dataclass
class ParallelAdapterConfig(DeltaConfig):
    method: ClassVar[str] = "parallel_adapter"
    family: ClassVar[str] = "addition"
    trains: ClassVar[str] = "bottleneck MLPs run beside the FFN, from its input to its output"
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True

    targets: Targets = ("ffn.out",)
    input_from: Targets = ("ffn.in",)
    layers: Layers = None
    bottleneck: int = setting(24, size=True, limit="width")
    non_linearity: str = "relu"
    scaling: float = setting(4.0, gt=0)

    def validate(self) -> None:
        super().validate()
        check_non_linearity(self, self.non_linearity)
        if not self.input_from:
            raise ValueError("ParallelAdapterConfig.input_from must name the module whose input feeds the adapter")

    def build(self) -> ParallelAdapter:
        return ParallelAdapter(self)


def _linear_or_error(model: nn.Module, name: str, role: str) -> nn.Module:
    hint = "use FFN projections such as 'ffn.in' (input_from) and 'ffn.out' (targets)"
    return linear_target(model, name, f"parallel adapter {role}", hint)


class ParallelAdapter(Delta):
    config: ParallelAdapterConfig

    def __init__(self, config: ParallelAdapterConfig) -> None:
        super().__init__(config)
        self.adapters = nn.ModuleDict()
        self.sources: dict[str, str] = {}  # target module -> module whose input is read
        # source module -> [cached input, consumers left this forward]
        self._cache: dict[str, list[Any]] = {}

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        targets = self.targets(model, cfg.targets, cfg.layers)
        first_source: dict[str, str] = {}
        for name in resolve(model, cfg.input_from):
            block = block_of(name)
            if block is not None:
                first_source.setdefault(block, name)
        for name in targets:
            block = block_of(name)
            if block is None or block not in first_source:
                raise ValueError(
                    f"parallel adapter target {name!r} has no module matching input_from={cfg.input_from!r} "
                    f"in its transformer block {block!r}; name the FFN's first projection in input_from"
                )
            self.sources[name] = first_source[block]
        consumers: dict[str, int] = {}
        for name in targets:
            consumers[self.sources[name]] = consumers.get(self.sources[name], 0) + 1
        for source, count in consumers.items():
            module = _linear_or_error(model, source, "input_from")
            hooks.on_input(module, self._cache_hook(source, count))
        for name in targets:
            module = _linear_or_error(model, name, "target")
            in_dim = linear_dims(model.get_submodule(self.sources[name]))[0]
            out_dim = linear_dims(module)[1]
            dtype, device = param_dtype_device(module)
            block = Bottleneck(in_dim, cfg.bottleneck, out_dim, cfg.non_linearity, cfg.scaling, dtype, device)
            self.adapters[safe_key(name)] = block
            self.sites[name] = sum(p.numel() for p in block.parameters())
            hooks.on_output(module, self._add_hook(block, self.sources[name]))

    def _cache_hook(self, source: str, consumers: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._cache[source] = [first_input(args, kwargs), consumers]
            return args, kwargs

        return hook

    def _add_hook(self, block: Bottleneck, source: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            entry = self._cache.get(source)
            if entry is None:
                raise RuntimeError(
                    f"parallel adapter: the input of {source!r} was not seen before its paired output module ran; "
                    "this block does not call its FFN projections in order, set input_from/targets explicitly"
                )
            x = entry[0]
            entry[1] -= 1
            if entry[1] <= 0:  # last reader: drop the activation so it is not kept past this forward
                del self._cache[source]
            return output + block(x).to(output.dtype)

        return hook
