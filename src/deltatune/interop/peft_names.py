"""Which modules of the model a PEFT adapter's keys name, and imports that leave nothing behind when refused.

PEFT saves module names as they were in the model the adapter was trained on. An adapter trained on the bare
backbone (`BertModel`: `encoder.layer.0.attention.self.query`) and loaded onto its task model
(`BertForSequenceClassification`: `bert.encoder.layer.0...`), or the other way round, names every module one
level off. The names matched our targets by suffix, the copy then looked them up by the saved name and failed
with a bare `KeyError` from torch, and the half-attached delta stayed on the model (its `save_pretrained`
refused from then on). PEFT itself loads such a folder with a "missing keys" warning and computes the base
model's outputs. Here the keys are renamed by the model's `base_model_prefix`, as transformers does when it
loads a base checkpoint into a task model; a name that still differs from the model's is refused naming the
full name it stands inside of.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from ..core.marks import owner
from ..core.model import DeltaModel
from ..core.targeting import resolve

F = TypeVar("F", bound=Callable[..., DeltaModel])


def backbone_of(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, DeltaModel) else model


def rebase(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` keyed by this model's module names: one level of `base_model_prefix` added (an adapter of the
    bare backbone on its task model) or removed (the reverse) where that, and only that, makes the names fit."""
    backbone = backbone_of(model)
    prefix = getattr(backbone, "base_model_prefix", "") or ""
    children = dict(backbone.named_children())
    firsts = {k.split(".", 1)[0] for k in tensors}
    if not prefix or not tensors or firsts & set(children) - {prefix}:
        return tensors
    inner = children.get(prefix)
    if inner is not None and prefix not in firsts and firsts <= {n for n, _ in inner.named_children()}:
        return {f"{prefix}.{k}": v for k, v in tensors.items()}
    if inner is None and firsts == {prefix}:
        return {k.split(".", 1)[1]: v for k, v in tensors.items()}
    return tensors


def check_modules(model: nn.Module, names: Iterable[str], error: type[Exception]) -> None:
    """Every name is a module of the model as it stands. One that is only the tail of a longer name (a T5
    encoder's `block.0...` on T5ForConditionalGeneration, `encoder.block.0...` there) is refused naming those;
    one that names nothing anywhere gets the targeting error with the closest names."""
    backbone = backbone_of(model)
    modules = dict(backbone.named_modules())
    names = tuple(names)
    for name in names:
        if name in modules:
            continue
        inside = sorted(n for n in modules if n.endswith("." + name))
        if inside:
            raise error(
                f"the adapter names module {name!r}, which this {type(backbone).__name__} has only inside "
                f"{', '.join(repr(n) for n in inside[:3])}: it was saved on another model class (PEFT loads it "
                "with a missing-keys warning and leaves it unused); load it onto that class"
            )
    resolve(backbone, names)  # names that match nothing: a TargetError with the closest ones


def all_or_nothing(importer: F) -> F:
    """An import that fails leaves the model as it was: the delta it had begun to attach is removed (and with
    the model's last delta, the hooks and marks), so a refused folder does not leave a half delta acting."""

    @functools.wraps(importer)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> DeltaModel:
        before = set(_owner(model).deltas) if _owner(model) is not None else set()
        try:
            return importer(model, *args, **kwargs)
        except BaseException:
            dm = _owner(model)
            for name in [n for n in (dm.deltas if dm is not None else ()) if n not in before]:
                dm.detach(name)
            raise

    return run  # type: ignore[return-value]


def _owner(model: nn.Module) -> DeltaModel | None:
    return model if isinstance(model, DeltaModel) else owner(model)
