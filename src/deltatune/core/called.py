"""A transformers model that its wrapper calls past `__call__` (`model.forward(...)`) still runs its hooks.

sentence-transformers' Transformer module runs its model as `getattr(model, "forward")(**features)`, so the
forward hooks of that model never ran: prompt tuning, whose hooks prepend the prompt to that stack's input and
drop it from the output, changed nothing (all-MiniLM-L6-v2: the base model's embeddings, no error). While deltas
are attached to a module that is no transformers model but holds some (`marks.mark`), each outermost one held
gets an instance `forward` (`CallThrough`): called directly it goes through the module's call, hooks included;
inside that call it is the forward the module had. Removed with the last delta. A plain transformers backbone
gets none: it and the models inside it are called through `__call__`.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

from torch import nn

from .targeting import held_models


class CallThrough:
    """`module.forward` while guarded. Which threads are inside the module's call is counted by its own first
    pre-hook and an always-called forward hook (a dict, so that `copy.deepcopy` of the model copies it)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.own = vars(module).get("forward")  # a forward set on the instance before (accelerate's hooks)
        self.inside: dict[int, int] = {}
        self.removed = False
        forward = self.own or type(module).forward.__get__(module)
        try:
            self.__signature__ = inspect.signature(forward)  # tools read the parameters of model.forward
        except (TypeError, ValueError):
            pass
        self.handles = [
            module.register_forward_pre_hook(self._enter, prepend=True),
            module.register_forward_hook(self._leave, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: Any) -> None:
        ident = threading.get_ident()
        self.inside[ident] = self.inside.get(ident, 0) + 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        ident = threading.get_ident()
        if self.inside.get(ident, 0) <= 1:
            self.inside.pop(ident, None)
        else:
            self.inside[ident] -= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # inside nn.Module's call, or removed while another wrapper (accelerate's offload hooks) still holds it
        if self.removed or self.inside.get(threading.get_ident()):
            forward = self.own or type(self.module).forward.__get__(self.module)
            return forward(*args, **kwargs)
        return self.module(*args, **kwargs)

    def remove(self) -> None:
        self.removed = True
        for handle in self.handles:
            handle.remove()
        if vars(self.module).get("forward") is self:
            if self.own is None:
                del vars(self.module)["forward"]
            else:
                vars(self.module)["forward"] = self.own


HELD = "_deltatune_call_through"  # where a guarded module keeps its CallThrough (its forward may be wrapped again)


def guard(backbone: nn.Module) -> None:
    """Route direct `forward` calls of the models held inside `backbone` through their call (again harmless)."""
    for _, module in held_models(backbone):
        if HELD not in vars(module):
            vars(module)[HELD] = vars(module)["forward"] = CallThrough(module)


def unguard(backbone: nn.Module) -> None:
    """Remove the guards; one that another wrapper took in since (accelerate's hooks) is then the plain forward."""
    for _, module in held_models(backbone):
        through = vars(module).pop(HELD, None)
        if through is not None:
            through.remove()
