"""The class a DeltaModel takes on for its backbone: what tools read from `type(model)`, not the instance.

- Trainer reads `type(model).forward` for the label names (`find_labels`) and `model.forward` for the columns
  to keep, so the backbone's forward signature (plus `delta_ids`) must live on the class;
- tools tell a model's family by its class name, so the class carries the backbone's `__name__`;
- trainers that reload a checkpoint their own way rebuild the model's class from the folder and copy its
  `state_dict()` in (sentence-transformers 5: `type(model)(folder)`): for a DeltaModel the folder holds what
  `save_pretrained` wrote, and `type(dm)(folder)` reads it back (`core.reload`). Attributes another library's
  tools call on the class come from `registry.CLASS_EXTRAS` (the core names no library).

One class per (DeltaModel class, backbone class), cached; the real forward is unchanged.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from torch import nn

from .registry import CLASS_EXTRAS
from .reload import SavedDeltas

_CLASSES: dict[tuple[type, type], type] = {}


def signed_class(cls: type, backbone_cls: type) -> type:
    """A subclass of `cls` whose `forward` advertises `backbone_cls.forward`'s parameters plus `delta_ids`."""
    key = (cls, backbone_cls)
    if key in _CLASSES:
        return _CLASSES[key]
    try:
        sig = inspect.signature(backbone_cls.forward)
    except (TypeError, ValueError):  # a backbone without an inspectable forward: keep the generic one
        return cls
    params = list(sig.parameters.values())
    if "delta_ids" not in sig.parameters:
        extra = inspect.Parameter("delta_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    base_forward = cls.forward

    @functools.wraps(base_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return base_forward(self, *args, **kwargs)

    forward.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    # Tools tell a model's family by its class name (`__name__` or `_get_name()`): Trainer shifts the labels
    # of label smoothing only for names of causal LMs and tells question answering models by theirs, and
    # pipelines check it against the task's models. So the class carries the backbone's `__name__`; its
    # `__qualname__` (type reprs, `repr(dm)`) says what it is.
    qualname = f"{cls.__name__}[{backbone_cls.__name__}]"

    def __repr__(self: nn.Module) -> str:
        return qualname + super(sub, self).__repr__().removeprefix(backbone_cls.__name__)

    def __new__(klass: type, *args: Any, **kwargs: Any) -> Any:
        """`type(dm)(folder, ...)`: the deltas a checkpoint folder holds, whose `state_dict()` `dm` loads exactly.
        A DeltaModel itself is built as DeltaModel(backbone) and takes this class on afterwards; copies and
        unpickling call `__new__` without arguments."""
        if args and isinstance(args[0], (str, os.PathLike)):
            return SavedDeltas(args[0])
        if args or kwargs:
            raise TypeError(f"build a DeltaModel with deltatune.attach(model, ...), not {qualname}(...)")
        return super(sub, klass).__new__(klass)

    body = {
        "forward": forward,
        "__repr__": __repr__,
        "__new__": __new__,
        "__module__": cls.__module__,
        "__qualname__": qualname,
    }
    for extras in CLASS_EXTRAS:
        body.update(extras(backbone_cls))
    sub = type(backbone_cls.__name__, (cls,), body)
    _CLASSES[key] = sub
    return sub
