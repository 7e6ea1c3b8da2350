"""What the weight-update methods on linear layers share (LoHa, LoKr, VeRA, DoRA, OFT, AdaLoRA).

Each such method gives every targeted linear layer a small module (`LinearUpdate`) holding its
factors. By default the layer's output gets `update(x)` added (an output hook, so mixed batches route
through the generic row machinery), and merging folds `weight_delta()` into W, unmerging subtracts it.
Methods whose change is not additive (DoRA rescales, OFT rotates) override `apply`/`merged_weight`;
their unmerge restores the weights kept aside at merge, so it is bitwise exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.delta import Delta, DeltaConfig, Hooks, safe_key
from ...core.layers import (
    PROJECTIONS,
    delta_dtype,
    first_input,
    linear_dims,
    linear_target,
    loaded,
    stored_weight,
    weight_update,
)


class LinearUpdate(nn.Module):
    """One linear layer's share of a delta. `additive`: the merge is W + weight_delta()."""

    additive = True

    def weight_delta(self) -> torch.Tensor:
        """The (out, in) change to W."""
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The change to the layer's output for input x (default: x through weight_delta)."""
        delta = self.weight_delta()
        return F.linear(x.to(delta.dtype), delta)

    def apply(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return output + self.update(x).to(output.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight that computes what the unmerged layer computes."""
        return weight + self.weight_delta().to(weight.dtype)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), whatever its storage (GPT-2's Conv1D stores (in, out))."""
    return weight_update(module, loaded(module))


class LinearDelta(Delta):
    """Builds one `LinearUpdate` per targeted linear layer via `make_layer`, hooks it, merges it."""

    def __init__(self, config: DeltaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleDict()
        self._names: dict[str, str] = {}
        self._stash: dict[str, torch.Tensor] = {}  # original weights of non-additive merges

    def make_layer(self, name: str, module: nn.Module, in_features: int, out_features: int) -> LinearUpdate:
        raise NotImplementedError

    def linear_targets(self, model: nn.Module) -> list[str]:
        cfg = self.config
        names = self.targets(model, cfg.targets, cfg.layers)
        for name in names:
            linear_target(model, name, f"{cfg.method} target", PROJECTIONS)
        return names

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        for name in self.linear_targets(model):
            module = model.get_submodule(name)
            layer = self.make_layer(name, module, *linear_dims(module))
            layer.to(dtype=delta_dtype(module), device=module.weight.device)
            key = safe_key(name)
            self.layers[key] = layer
            self._names[key] = name
            self.sites[name] = sum(p.numel() for p in layer.parameters())
            self.hook(hooks, module, layer)

    def hook(self, hooks: Hooks, module: nn.Module, layer: LinearUpdate) -> None:
        hooks.on_output(module, lambda mod, args, kwargs, out: layer.apply(mod, first_input(args, kwargs), out))

    def each(self, model: nn.Module):
        for key, layer in self.layers.items():
            yield key, model.get_submodule(self._names[key]), layer

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        for key, module, layer in self.each(model):
            weight = stored_weight(module)
            if not layer.additive:
                self._stash[key] = weight.detach().clone()
            new = layer.merged_weight(weight_update(module, weight).detach())  # W, not W + a specification's d
            weight.copy_(weight_update(module, new).to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        for key, module, layer in self.each(model):
            weight = stored_weight(module)
            if layer.additive:
                weight.sub_(weight_update(module, layer.weight_delta()).to(weight.dtype))
            else:
                weight.copy_(self._stash.pop(key))


def map_first_input(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:  # noqa: ANN001
    """(args, kwargs) with the layer's input tensor replaced by fn(input)."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    for key in ("input", "hidden_states", "x"):
        if key in kwargs:
            return args, {**kwargs, key: fn(kwargs[key])}
    raise TypeError("cannot find the input tensor of this call")
