"""(IA)^3 (Liu et al. 2022): learned vectors that rescale keys, values and the FFN's inner activation.

Attention keys and values are rescaled on the *output* of their projections (a vector of
out_features); the FFN is rescaled on the *input* of its output projection (a vector of its
in_features, i.e. after the nonlinearity), as in the paper. Which side a target scales is decided
by `feedforward`: targets that also match it scale the module input, all others the output.

Fused projections are honest rather than clever: GPT-2's `c_attn` computes q|k|v in one layer, and
`attn.k`/`attn.v` both name it, so one vector scales its whole 3d output (queries included).

The vectors start at one (identity at init). Because a diagonal scaling commutes into the adjacent
weight, (IA)^3 is mergeable: output scaling multiplies W's rows (and the bias), input scaling W's
columns; GPT-2's Conv1D stores W as (in, out), so rows and columns swap there. Unmerging divides,
which needs every entry of the vectors to be nonzero.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ...core.delta import Delta, DeltaConfig, DeltaError, Hooks, safe_key
from ...core.layers import delta_dtype, is_transposed, linear_dims, linear_target, map_hidden, stored_weight
from ...core.targeting import Layers, TargetError, Targets, resolve

_MIN_ABS = 1e-8


@dataclasses.dataclass
class IA3Config(DeltaConfig):
    method: ClassVar[str] = "ia3"
    family: ClassVar[str] = "addition"
    trains: ClassVar[str] = "vectors rescaling attention keys, values and the FFN inner activation"
    mergeable: ClassVar[bool] = True
    default_lr: ClassVar[float] = 3e-3
    identity_at_init: ClassVar[bool] = True
    peft_names: ClassVar[dict[str, str]] = {"target_modules": "targets", "feedforward_modules": "feedforward"}

    targets: Targets = ("attn.k", "attn.v", "ffn.out")
    feedforward: Targets = ("ffn.out",)
    layers: Layers = None

    def build(self) -> IA3:
        return IA3(self)


def _scale_first_input(args: tuple, kwargs: dict, vector: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        x = args[0]
        return (x * vector.to(x.dtype), *args[1:]), kwargs
    for key in ("input", "hidden_states", "x"):
        if key in kwargs:
            x = kwargs[key]
            return args, {**kwargs, key: x * vector.to(x.dtype)}
    raise TypeError("cannot find the input tensor of this call")


class IA3(Delta):
    config: IA3Config

    def __init__(self, config: IA3Config) -> None:
        super().__init__(config)
        self.vectors = nn.ParameterDict()
        self._names: dict[str, str] = {}
        self._scales_input: dict[str, bool] = {}

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        targets = self.targets(model, cfg.targets, cfg.layers)
        feedforward: set[str] = set()
        if cfg.feedforward:
            try:
                feedforward = set(resolve(model, cfg.feedforward))
            except TargetError as err:
                if tuple(cfg.feedforward) == IA3Config.feedforward:  # the default, where the model has no ffn.out
                    feedforward = set()  # (Mixtral's experts): the targets resolved without it, none scales input
                else:
                    raise ValueError(
                        f"IA3Config.feedforward: {err}; set feedforward=() if no target scales its input"
                    ) from err
        stray = sorted(feedforward - set(self.targets(model, cfg.targets, None)))
        if stray and tuple(cfg.feedforward) != IA3Config.feedforward:  # a default outside custom targets: unused
            raise ValueError(
                f"IA3Config.feedforward names {stray[0]!r}{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}, "
                "which is not among the targets, so nothing would scale its input; add it to targets, or drop it "
                "from feedforward (PEFT's rule: feedforward modules are a subset of the targets)"
            )
        for name in targets:
            module = linear_target(
                model, name, "(IA)^3 target", "target projections such as 'attn.k', 'attn.v' and 'ffn.out'"
            )
            in_f, out_f = linear_dims(module)
            scales_input = name in feedforward
            vector = nn.Parameter(
                torch.ones(in_f if scales_input else out_f, dtype=delta_dtype(module), device=module.weight.device)
            )
            key = safe_key(name)
            self.vectors[key] = vector
            self._names[key] = name
            self._scales_input[key] = scales_input
            self.sites[name] = vector.numel()
            if scales_input:
                hooks.on_input(module, _input_hook(self.vectors, key))
            else:
                hooks.on_output(module, _output_hook(self.vectors, key))

    def _rescale_weights(self, model: nn.Module, divide: bool) -> None:
        for key, vector in self.vectors.items():
            module = model.get_submodule(self._names[key])
            weight = stored_weight(module)  # under another delta's parametrization: its original
            v = vector.detach().to(weight.dtype)
            if divide:
                v = 1.0 / v
            # (out, in) layout: output scaling hits rows; Conv1D stores (in, out), so the axes swap.
            on_rows = (not self._scales_input[key]) != is_transposed(module)
            weight.mul_(v[:, None] if on_rows else v[None, :])
            if not self._scales_input[key] and getattr(module, "bias", None) is not None:
                stored_weight(module, "bias").mul_(v)

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        self._rescale_weights(model, divide=False)

    def unmerge_refusal(self) -> str | None:
        for key, vector in self.vectors.items():
            if bool((vector.abs() < _MIN_ABS).any()):
                return (
                    f"(IA)^3 vector for {self._names[key]!r} has entries with |l| < {_MIN_ABS}, and unmerging divides "
                    "by them, so the original weights could not be recovered"
                )
        return None

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        refusal = self.unmerge_refusal()
        if refusal:
            raise DeltaError(f"{refusal}; reload the backbone instead")
        self._rescale_weights(model, divide=True)


# Hooks look the vector up at call time, so a later `.to()` or `load_state_dict` is always seen.
def _output_hook(vectors: nn.ParameterDict, key: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return map_hidden(output, lambda h: h * vectors[key].to(h.dtype))

    return hook


def _input_hook(vectors: nn.ParameterDict, key: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _scale_first_input(args, kwargs, vectors[key])

    return hook
