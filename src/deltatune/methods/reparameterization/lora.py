"""LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with A random and B zero so training starts at W.

The update is computed beside the frozen layer (an output hook), never by materializing
W + BA, so a training step needs no weight-sized tensors and no weight gradients.
Merging folds (alpha / r) * B A into W; GPT-2's Conv1D stores W transposed and gets B A transposed.

An embedding table (num, dim) takes LoRA as in microsoft/LoRA and PEFT: row `id` of A^T (A is (r, num))
is looked up and multiplied by B (dim, r); A starts at zero and B random. Its input is token ids, so
`dropout` does not act there (as in both). A table tied to the output head is not merged (core.merge
refuses tied weights: the head would change with it).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.delta import Delta, DeltaConfig, Hooks, safe_key, setting
from ...core.layers import (
    PROJECTIONS,
    delta_dtype,
    first_input,
    linear_dims,
    linear_target,
    stored_weight,
    weight_update,
)
from ...core.routing import mark_shared, needs_graph
from ...core.settings import MAX_SIZE
from ...core.targeting import Layers, TargetError, Targets


@dataclasses.dataclass
class LoRAConfig(DeltaConfig):
    method: ClassVar[str] = "lora"
    family: ClassVar[str] = "reparameterization"
    trains: ClassVar[str] = "rank-r factors A, B of an update B·A to chosen weight matrices"
    mergeable: ClassVar[bool] = True
    merge_adds: ClassVar[bool] = True  # W + dW: commutes with other such deltas on a module (core.merge)
    identity_at_init: ClassVar[bool] = True
    # measured (docs/training.md): 2e-3 beat 1e-3 on SST-2, TREC and TweetEval-emotion with MiniLM-L6
    default_lr: ClassVar[float] = 2e-3
    peft_names: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout", "rank": "r"}

    targets: Targets = ("attn.q", "attn.v")
    layers: Layers = None
    r: int = setting(8, size=True, limit="width")
    alpha: float = setting(16.0, gt=0)
    dropout: float = setting(0.0, ge=0, lt=1)
    # per-module rank / alpha, as PEFT's: a key matches a module named `key` or ending in `.key` (a regex)
    rank_pattern: dict[str, int] | None = setting(None, ge=1, le=MAX_SIZE, limit="width")
    alpha_pattern: dict[str, float] | None = setting(None, gt=0)

    def build(self) -> LoRA:
        return LoRA(self)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """This module's (r, alpha): the first matching pattern key, else `r` and `alpha`."""
        return pattern_value(self.rank_pattern, module, self.r), float(
            pattern_value(self.alpha_pattern, module, self.alpha)
        )


def pattern_value(pattern: dict | None, module: str, default: float) -> float:
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_patterns(config: LoRAConfig, modules: list[str]) -> list[str]:
    """Every rank_pattern / alpha_pattern key matches one of the delta's modules: a misspelt key ("quary") left
    every module at `r` without a word, where a misspelt target is refused. Returns `modules`."""
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field) or {}:
            if not any(re.match(rf"(.*\.)?({key})$", m) for m in modules):
                tails = sorted({m.rsplit(".", 1)[-1] for m in modules})
                close = difflib.get_close_matches(str(key), tails, n=3, cutoff=0.5)
                hint = f"closest: {', '.join(close)}" if close else f"the delta's modules end in {', '.join(tails[:6])}"
                raise TargetError(
                    f"{field} key {key!r} matches none of the {len(modules)} modules this {config.method} attaches to "
                    f"(a key matches a module named so or ending in .<key>); {hint}"
                )
    return modules


class LoRALayer(nn.Module):
    """The factors for one linear layer. `A` is (r, in), `B` is (out, r), as in the paper."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the init of nn.Linear, as microsoft/LoRA
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * B A x alone, in the factors' dtype."""
        return self.add_to(None, x)

    def add_to(self, output: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """output + (alpha / r) * B A x, as one addmm on 2-D views when the dtypes agree.

        The scaling rides on addmm's alpha and the sum on its beta, so neither a scaled copy nor a
        separate sum of the (tokens, out) update is materialized, forward or backward; there is no
        dropout op at p = 0 and no cast when the dtypes already match (docs/benchmarks.md).
        """
        if self.dropout is not None:
            x = self.dropout(x)
        if x.dtype != self.A.dtype:
            x = x.to(self.A.dtype)
        h = F.linear(x.reshape(-1, x.shape[-1]), self.A)
        shape = (*x.shape[:-1], self.B.shape[0])
        if output is not None and output.dtype == self.B.dtype:
            return torch.addmm(output.reshape(-1, shape[-1]), h, self.B.t(), alpha=self.scaling).view(shape)
        update = F.linear(h * self.scaling, self.B).view(shape)
        return update if output is None else output + update.to(output.dtype)

    def weight_delta(self) -> torch.Tensor:
        """The (out, in) change to W that merging applies."""
        return (self.B @ self.A) * self.scaling


class LoRAEmbedding(LoRALayer):
    """The factors for an embedding table: `A` is (r, num_embeddings), looked up by token id, `B` is (dim, r)."""

    def __init__(self, table: nn.Embedding, r: int, alpha: float, dtype: torch.dtype) -> None:
        super().__init__(table.num_embeddings, table.embedding_dim, r, alpha, 0.0, dtype, table.weight.device)
        nn.init.zeros_(self.A)
        nn.init.normal_(self.B)
        self.padding_idx = table.padding_idx

    def add_to(self, output: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.embedding(ids, self.A.t(), self.padding_idx), self.B) * self.scaling
        return update if output is None else output + update.to(output.dtype)

    def weight_delta(self) -> torch.Tensor:
        """The (num, dim) change to the table."""
        return (self.B @ self.A).t() * self.scaling


class LoRA(Delta):
    config: LoRAConfig

    def __init__(self, config: LoRAConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleDict()
        self._modules_by_key: dict[str, str] = {}

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        for name in check_patterns(cfg, list(self.targets(model, cfg.targets, cfg.layers))):
            r, alpha = cfg.rank_alpha(name)
            module = model.get_submodule(name)
            if isinstance(module, nn.Embedding):
                layer: LoRALayer = LoRAEmbedding(module, r, alpha, delta_dtype(module))
                mark_shared(module, name)  # T5's relative position table: no rows of its own to route
            else:
                module = linear_target(model, name, "LoRA target", PROJECTIONS + " or an embedding")
                in_f, out_f = linear_dims(module)
                layer = LoRALayer(in_f, out_f, r, alpha, cfg.dropout, delta_dtype(module), module.weight.device)
            key = safe_key(name)
            self.layers[key] = layer
            self._modules_by_key[key] = name
            self.sites[name] = sum(p.numel() for p in layer.parameters())
            hooks.on_output(module, _lora_hook(layer, self), route_aware=True)

    def _each(self, model: nn.Module):
        for key, layer in self.layers.items():
            yield model.get_submodule(self._modules_by_key[key]), layer

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> None:
        for module, layer in self._each(model):
            weight = stored_weight(module)  # under a specification delta's parametrization: its original
            weight.add_(weight_update(module, layer.weight_delta()).to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, model: nn.Module) -> None:
        for module, layer in self._each(model):
            weight = stored_weight(module)
            weight.sub_(weight_update(module, layer.weight_delta()).to(weight.dtype))


HALF = (torch.bfloat16, torch.float16)


def _lora_hook(layer: LoRALayer, delta: LoRA):
    """Adds the update to the whole batch, or in a mixed batch to the delta's rows only.

    Route-aware: the rows' updates are added into the full output with one `index_add`, in place
    when no gradient is recorded, instead of gathering and scattering whole (rows, out) outputs per
    delta as the generic routing does; a batch over many deltas then costs little more than one.
    In bfloat16 and float16 the rows' outputs are gathered and summed as the whole batch sums them (one
    addmm, one rounding): an update rounded on its own and then added rounds twice, and a mixed batch on
    a bf16 GPT-2 gave 8 of 240 greedy tokens other than each row generated alone.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = first_input(args, kwargs)
        route = delta.route
        if route is None or route.full:
            return layer.add_to(output, x)
        idx = route.index(x.shape[0], module)
        xs = x.index_select(0, idx)
        if output.dtype in HALF and output.dtype == layer.B.dtype:
            rows = layer.add_to(output.index_select(0, idx), xs)
            return output.index_copy(0, idx, rows) if needs_graph(output, rows) else output.index_copy_(0, idx, rows)
        rows = layer.update(xs).to(output.dtype)
        if needs_graph(output, rows):
            return output.index_add(0, idx, rows)
        return output.index_add_(0, idx, rows)

    return hook
