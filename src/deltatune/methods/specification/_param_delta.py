"""What the specification methods share: a trainable additive delta on chosen backbone parameters.

Specification methods "train existing parameters". Training them in place would make the backbone
impossible to restore bitwise and would forbid several named deltas on one backbone, so every chosen
parameter W gets a same-shaped tensor D, zero at init, and the backbone computes with W + D through a
parametrization (`hooks.on_param`). Merging adds D into W; unmerging subtracts the same D.

A tensor shared by several modules (tied input/output embeddings) is one parameter: it gets one D,
counted once, and every module holding it is reparametrized with that D, as training the shared
tensor itself would change all of them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...core.delta import Delta, DeltaConfig, DeltaError, Hooks, safe_key
from ...core.layers import refuse_quantized
from ...core.targeting import backbone_modules, head_names, in_head

Keep = Callable[[str, nn.Module, str, torch.Tensor], bool]


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """One backbone tensor chosen for a delta, with every (module, attribute) that holds it."""

    module: str
    param: str
    owners: tuple[tuple[str, str], ...]
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}"

    @property
    def numel(self) -> int:
        return self.shape.numel()


def own_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's direct parameters, including ones another delta has already reparametrized.

    Listing those too means a second claim on them reaches `hooks.on_param`, which refuses it
    clearly, instead of the parameter silently dropping out of the selection.
    """
    for name, tensor in module._parameters.items():
        if tensor is not None:
            yield name, tensor
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            yield name, plist.original


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of the task head: children outside the base model, plus the output embeddings."""
    heads = set(head_names(model))
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.update(n for n, m in model.named_modules() if m is out and n)
    return tuple(sorted(heads))


def is_norm(module: nn.Module) -> bool:
    """Normalisation layers by class (LayerNorm, LlamaRMSNorm, T5LayerNorm, GroupNorm, BatchNorm1d ...)."""
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.modules.batchnorm._NormBase):
        return True
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(module, rms):
        return True
    return re.search(r"Norm(?:\dd)?$", type(module).__name__) is not None


def collect(
    model: nn.Module, selected: list[str], keep: Keep | None = None, exclude: tuple[str, ...] = ()
) -> list[ParamRef]:
    """Parameters of the selected modules and their descendants, each tensor once, in model order.

    Nested selections (a block and its sub-layer both matched) and tied tensors would otherwise
    be claimed twice. Modules under `exclude` (the head) are skipped.
    """
    modules = backbone_modules(model)
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in modules.items():
        for pname, tensor in own_parameters(module):
            owners.setdefault(id(tensor), []).append((mname, pname))
    chosen = set(selected)
    seen: set[int] = set()
    refs: list[ParamRef] = []
    for mname, module in modules.items():
        if not in_head(mname, chosen) or (exclude and in_head(mname, exclude)):
            continue
        for pname, tensor in own_parameters(module):
            if id(tensor) in seen or (keep is not None and not keep(mname, module, pname, tensor)):
                continue
            seen.add(id(tensor))
            refuse_quantized(f"{mname}.{pname}", tensor)
            refs.append(ParamRef(mname, pname, tuple(owners[id(tensor)]), tensor.shape, tensor.dtype, tensor.device))
    return refs


def name_filter(param_names: tuple[str, ...] | None) -> Keep | None:
    """Keep parameters whose qualified name is, or ends at a dot with, one of `param_names`."""
    if param_names is None:
        return None
    wanted = tuple(param_names)

    def keep(mname: str, module: nn.Module, pname: str, tensor: torch.Tensor) -> bool:
        full = f"{mname}.{pname}"
        return any(full == w or full.endswith("." + w) for w in wanted)

    return keep


class ParamDelta(Delta):
    """A delta made of additive tensors on backbone parameters: W -> W + effective(key)."""

    def __init__(self, config: DeltaConfig) -> None:
        super().__init__(config)
        self.delta = nn.ParameterDict()
        self._refs: dict[str, ParamRef] = {}

    def claim(self, model: nn.Module, hooks: Hooks, ref: ParamRef) -> str:
        """Create D = 0 for `ref` and reparametrize every module holding the tensor; returns D's key."""
        key = safe_key(ref.name)
        self.delta[key] = nn.Parameter(torch.zeros(ref.shape, dtype=ref.dtype, device=ref.device))
        self._refs[key] = ref
        for mname, pname in ref.owners:
            try:
                hooks.on_param(model.get_submodule(mname), pname, self._param_fn(key), mname)
            except DeltaError as err:
                raise DeltaError(f"{self.config.method} cannot claim {mname}.{pname}: {err}") from err
        self.sites[ref.module] = self.sites.get(ref.module, 0) + ref.numel
        return key

    def claim_all(self, model: nn.Module, hooks: Hooks, refs: list[ParamRef]) -> None:
        for ref in refs:
            self.claim(model, hooks, ref)

    def effective(self, key: str) -> torch.Tensor:
        """The change the backbone sees for this parameter in the current mode."""
        return self.delta[key]

    def merge_value(self, key: str) -> torch.Tensor:
        """The change merging folds into the weight (deterministic, unlike a sampled one)."""
        return self.effective(key)

    def _param_fn(self, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(weight: torch.Tensor) -> torch.Tensor:
            return weight + self.effective(key).to(weight.dtype)

        return fn

    def _original(self, model: nn.Module, key: str) -> torch.Tensor:
        ref = self._refs[key]
        module = model.get_submodule(ref.module)
        if parametrize.is_parametrized(module, ref.param):
            return module.parametrizations[ref.param].original
        return getattr(module, ref.param)

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        for key in self.delta:
            original = self._original(model, key)
            original.add_(self.merge_value(key).to(original.dtype))

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        for key in self.delta:
            original = self._original(model, key)
            original.sub_(self.merge_value(key).to(original.dtype))
