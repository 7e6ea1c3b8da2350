"""What every delta method is made of, without naming any method.

A method is a `DeltaConfig` dataclass (hyperparameters with the papers' defaults) whose
`build()` returns a `Delta`: an `nn.Module` holding the trainable tensors plus an `attach()`
that reaches into the backbone only through `Hooks`. Hooks are the three ways a delta can act
without editing model code: rewrite a module's output, rewrite its inputs, or reparametrize one
of its parameters. Because every change goes through `Hooks`, detaching is generic and exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from .targeting import Layers, Targets, resolve


class DeltaError(RuntimeError):
    """A delta used in a way it does not support (merge of a non-mergeable method, ...)."""


@dataclasses.dataclass
class DeltaConfig:
    """Base of every method's config. Subclasses set `method`, `family` and `trains`."""

    method: ClassVar[str] = ""
    family: ClassVar[str] = ""
    trains: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate that works for this method at base-model scale

    def build(self) -> Delta:
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix; called before anything is attached."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in {"r", "bottleneck", "num_tokens", "dim", "rank"} and isinstance(value, int):
                if value <= 0:
                    raise ValueError(f"{type(self).__name__}.{field.name} must be a positive integer, got {value}")
            if field.name in {"dropout"} and isinstance(value, float) and not 0.0 <= value < 1.0:
                raise ValueError(f"{type(self).__name__}.{field.name} must be in [0, 1), got {value}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


def safe_key(module_name: str) -> str:
    """Module names contain dots, which `nn.ModuleDict` keys may not."""
    return module_name.replace(".", "__")


class _ParamDelta(nn.Module):
    """A parametrization W -> fn(W) that can be switched off without removing it.

    The delta's tensors are *not* registered here (that would put them in the backbone's
    state_dict); `fn` closes over them.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], delta: Delta) -> None:
        super().__init__()
        self.fn = fn
        object.__setattr__(self, "_delta", delta)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self._delta.active:
            return weight
        return self.fn(weight)


class Hooks:
    """Records every change a delta makes to a backbone so that `remove()` undoes all of it."""

    def __init__(self, delta: Delta, model: nn.Module) -> None:
        self.delta = delta
        self.model = model
        self._handles: list[RemovableHandle] = []
        self._params: list[tuple[nn.Module, str]] = []

    def on_output(self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict, Any], Any]) -> None:
        """`fn(module, args, kwargs, output) -> new output`; skipped while the delta is inactive."""
        delta = self.delta

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return fn(mod, args, kwargs, output) if delta.active else None

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def on_input(self, module: nn.Module, fn: Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]) -> None:
        """`fn(module, args, kwargs) -> (args, kwargs)`; skipped while the delta is inactive."""
        delta = self.delta

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            return fn(mod, args, kwargs) if delta.active else None

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_param(self, module: nn.Module, param_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Reparametrize `module.<param_name>` as `fn(original)` while the delta is active."""
        if parametrize.is_parametrized(module, param_name):
            raise DeltaError(
                f"parameter {param_name!r} of {type(module).__name__} is already claimed by another delta; "
                "two deltas cannot reparametrize the same parameter: narrow one of their targets"
            )
        parametrize.register_parametrization(module, param_name, _ParamDelta(fn, self.delta), unsafe=True)
        self._params.append((module, param_name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, name in reversed(self._params):
            original = module.parametrizations[name].original
            requires_grad = original.requires_grad
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            getattr(module, name).requires_grad_(requires_grad)
        self._handles.clear()
        self._params.clear()


class Delta(nn.Module):
    """One method's trainable tensors and the way they act on the backbone.

    Subclasses implement `attach`; mergeable ones implement `merge_into`/`unmerge_from`.
    `sites` maps each backbone module the delta touches to the number of delta parameters
    living there, which the tree view and `inspect` display.
    """

    def __init__(self, config: DeltaConfig) -> None:
        super().__init__()
        self.config = config
        self.enabled = True
        self.merged = False
        self.sites: dict[str, int] = {}
        self._hooks: Hooks | None = None

    @property
    def active(self) -> bool:
        """Hooks act only when enabled and not already folded into the weights."""
        return self.enabled and not self.merged

    def targets(self, model: nn.Module, targets: Targets, layers: Layers = None) -> list[str]:
        return resolve(model, targets, layers)

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        raise NotImplementedError

    def install(self, model: nn.Module) -> None:
        hooks = Hooks(self, model)
        try:
            self.attach(model, hooks)
        except BaseException:
            hooks.remove()
            raise
        self._hooks = hooks

    def uninstall(self) -> None:
        if self.merged:
            raise DeltaError("unmerge this delta before removing it, or the backbone keeps its weights changed")
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def regularization(self) -> torch.Tensor | None:
        """A term the training loop adds to the loss (e.g. diff pruning's L0 penalty); None for most methods."""
        return None

    def finalize(self) -> None:
        """Called once when training ends: prune a sparse diff, drop a reparameterization MLP, ..."""

    def merge_into(self, model: nn.Module) -> None:
        raise DeltaError(
            f"{self.config.method} cannot be merged into the backbone's weights "
            "(it adds computation a weight change cannot express); keep it unmerged"
        )

    def unmerge_from(self, model: nn.Module) -> None:
        self.merge_into(model)
