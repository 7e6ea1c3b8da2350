"""BitFit (Ben Zaken et al. 2021): train only the bias terms.

Each existing bias b of the targeted modules (linear layers, GPT-2's Conv1D, LayerNorm: any module's
own `bias` parameter) is trained as b + D with D zero at init, through a parametrization, so the
backbone's bias itself never changes. The task head is not part of the delta: it trains in full, as
the paper does, where the DeltaModel's train_head is on (`attach`'s default for classifiers).

Models without any bias in the targeted modules (Llama, T5) would leave BitFit nothing to train. As
OpenDelta's BitFit does, a zero-initialised bias is then *added* to every targeted linear layer as an
output offset (out + b), so BitFit stays "bias terms only" on every architecture. Norm layers without
bias (RMSNorm, T5LayerNorm) get none: use the `layernorm` method for them. `add_bias=True` adds biases
to bias-less linear layers even where others have biases; `add_bias=False` never adds any.
Merging folds D into existing biases and turns added biases into real `bias` parameters of their
layers (unmerging removes them again).

Count: sum of numel of the selected biases; with added biases, sum of out_features of those layers.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ...core.delta import DeltaConfig, DeltaError, Hooks, safe_key
from ...core.layers import delta_dtype, is_linear, linear_dims, map_hidden
from ...core.targeting import Layers, Targets, backbone_modules, in_head
from ._param_delta import ParamDelta, collect, head_prefixes


@dataclasses.dataclass
class BitFitConfig(DeltaConfig):
    method: ClassVar[str] = "bitfit"
    family: ClassVar[str] = "specification"
    trains: ClassVar[str] = "bias terms (deltas of existing biases; added zero biases where a model has none)"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True

    targets: Targets = None
    layers: Layers = None
    exclude_head: bool = True
    add_bias: bool | None = None

    def validate(self) -> None:
        super().validate()
        if self.add_bias not in (None, True, False):
            raise ValueError(
                f"BitFitConfig.add_bias must be None (add only when no bias exists), True or False, got {self.add_bias!r}"
            )

    def build(self) -> BitFit:
        return BitFit(self)


class BitFit(ParamDelta):
    config: BitFitConfig
    merge_writes: ClassVar[tuple[str, ...]] = ("bias",)  # a merge leaves the weights alone (quantized ones too)

    def __init__(self, config: BitFitConfig) -> None:
        super().__init__(config)
        self.added = nn.ParameterDict()
        self._added_modules: dict[str, str] = {}

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        selected = self.targets(model, cfg.targets, cfg.layers)
        exclude = head_prefixes(model) if cfg.exclude_head else ()
        if exclude and selected and all(in_head(n, exclude) for n in selected):
            raise ValueError(
                f"BitFit targets select only the task head ({', '.join(exclude)}), which exclude_head=True leaves out; "
                "set BitFitConfig(exclude_head=False) to tune the head's biases"
            )
        refs = collect(model, selected, keep=lambda m, mod, p, t: p == "bias", exclude=exclude)
        self.claim_all(model, hooks, refs)
        if cfg.add_bias or (cfg.add_bias is None and not refs):
            self._add_biases(model, hooks, selected, exclude)
        if not self.delta and not self.added:
            hint = (
                "no targeted linear layer lacks one either"
                if cfg.add_bias is not False
                else "add_bias=False forbids adding biases; set add_bias=None"
            )
            raise ValueError(
                f"BitFit found no bias parameters in the targeted modules of {type(model).__name__} ({hint}); "
                "target linear layers such as 'attn.q' or 'ffn.out', or use the 'layernorm' method for norm weights"
            )

    def _add_biases(self, model: nn.Module, hooks: Hooks, selected: list[str], exclude: tuple[str, ...]) -> None:
        chosen = set(selected)
        for name, module in backbone_modules(model).items():
            if not in_head(name, chosen) or (exclude and in_head(name, exclude)):
                continue
            if not is_linear(module) or getattr(module, "bias", None) is not None:
                continue
            key = safe_key(f"{name}.bias")
            weight = module.weight
            bias = nn.Parameter(torch.zeros(linear_dims(module)[1], dtype=delta_dtype(module), device=weight.device))
            self.added[key] = bias
            self._added_modules[key] = name
            self.sites[name] = self.sites.get(name, 0) + bias.numel()
            hooks.on_output(module, _offset_hook(self.added, key))

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        for name in self._added_modules.values():  # checked before anything is written
            if model.get_submodule(name).bias is not None:  # another BitFit delta's, merged: replacing it lost it
                raise DeltaError(
                    f"cannot merge: {name} already has a bias that another merged BitFit delta added there, and this "
                    "one's would replace it (the merged outputs would lose it); unmerge that delta first, or serve "
                    "them unmerged"
                )
        super().merge_into(model)
        for key, bias in self.added.items():
            module = model.get_submodule(self._added_modules[key])
            weight = module.weight  # the layer's own dtype (the delta keeps float32 beside bf16 weights)
            dtype = weight.dtype if weight.is_floating_point() else delta_dtype(module)
            module.bias = nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        super().unmerge_from(model)
        for key in self.added:
            model.get_submodule(self._added_modules[key]).bias = None


def _offset_hook(added: nn.ParameterDict, key: str):
    """Reads the bias from `added` at each call: FSDP (and `load_state_dict(assign=True)`) put new Parameter objects
    there, and a hook holding the first one trained a stale copy (FSDP2, tiny Llama: the biases never moved)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        bias = added[key]
        return map_hidden(output, lambda h: h + bias.to(h.dtype))

    return hook
