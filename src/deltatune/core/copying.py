"""`copy.deepcopy` of a DeltaModel is a model of its own; pickling it is refused with the call to use.

A delta acts through hooks and parametrizations on the backbone's modules, and those are closures
over the delta's layers. `copy.deepcopy` treats functions as constants, so a plain deep copy kept
the original's closures: the copy's forward read the *original's* delta weights (train the
original on, and a `best = copy.deepcopy(model)` snapshot silently changed with it), `detach()`
on the copy reached the original, and the copy kept the original alive. EMA and SWA helpers
(`torch.optim.swa_utils.AveragedModel`) and best-checkpoint snapshots deep-copy models, so the
copy must be exact: here every closure (or function with defaults) reachable from the model's
modules is rebuilt over copied cells and defaults, in the same memo as the rest of the copy, so the copy's hooks act on the copy's deltas.

Pickling (`pickle.dumps(dm)`, `torch.save(dm)`) cannot carry hook closures at all, and a model
that loses its hooks on the way would give the backbone's outputs without an error; it is refused
with one line naming the delta-sized formats instead.
"""

from __future__ import annotations

import contextlib
import copy
import types
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

NO_PICKLE = (
    "a DeltaModel cannot be pickled (pickle, torch.save(model), a process that pickles its arguments): "
    "its deltas act through hooks that pickle cannot carry. Save the deltas with dm.save_pretrained(folder) "
    "and load them with DeltaModel.from_pretrained(backbone, folder), or torch.save(dm.state_dict(), path) "
    "for a checkpoint; copy.deepcopy(dm) works within a process"
)

# nn.Module attributes holding hooks: the deltas' closures sit in these, on the backbone's modules
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _closures(root: nn.Module) -> list[types.FunctionType]:
    """Every function with a closure reachable from a module's hooks and attributes, nested ones included."""
    found: dict[int, types.FunctionType] = {}
    todo: list[Any] = []
    for module in root.modules():
        for attr in _HOOK_DICTS:
            todo.extend(getattr(module, attr, {}).values())
        todo.extend(vars(module).values())
    while todo:
        value = todo.pop()
        value = getattr(value, "hook", value)  # torch's _WrappedHook around a load_state_dict hook
        if isinstance(value, types.MethodType):
            value = value.__func__
        if not isinstance(value, types.FunctionType) or id(value) in found or not _holds(value):
            continue
        found[id(value)] = value
        todo.extend(value.__defaults__ or ())
        todo.extend((value.__kwdefaults__ or {}).values())
        for cell in value.__closure__ or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell (a name not bound yet when the closure was made)
                pass
    return list(found.values())


def _holds(fn: types.FunctionType) -> bool:
    """Whether a function carries objects of its own: closure cells, or defaults (`lambda ..., a=layer:`)."""
    return bool(fn.__closure__ or fn.__defaults__ or fn.__kwdefaults__)


def deep_copy(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """The default deep copy of `model`, with its closures rebuilt over deep-copied cells, taken as a plain call of
    the model (`traffic`): copied while another thread routed a batch or switched a delta, the copy kept that
    batch's rows on its deltas or half a switch (40 of 40 copies wrong, no error). A copy is idle: no rows routed,
    no thread inside it."""
    from .traffic import GATE

    gate = vars(model).get(GATE)
    traffic = getattr(gate, "traffic", None) or vars(model).get("_traffic")
    with traffic.plain() if traffic is not None else contextlib.nullcontext():
        new = _copied(model, memo)
    _settle(memo)
    return new


def _settle(memo: dict[int, Any]) -> None:
    """The copies' deltas route no rows and their call guards count no thread inside (the original's may have)."""
    from .called import CallThrough
    from .delta import Delta

    for obj in list(memo.values()):
        if isinstance(obj, Delta):
            obj.route = None
        elif isinstance(obj, CallThrough):
            obj.inside = {}


def _copied(model: nn.Module, memo: dict[int, Any]) -> nn.Module:
    new = type(model).__new__(type(model))
    memo[id(model)] = new
    functions = [fn for fn in _closures(model) if id(fn) not in memo]  # a DeltaModel's copy made them already
    cells: list[tuple[types.CellType, types.CellType]] = []
    for fn in functions:  # first every copy into the memo, empty, so that cycles through them resolve
        fresh = tuple(types.CellType() for _ in fn.__closure__ or ()) or None
        clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, None, fresh)
        clone.__dict__.update(fn.__dict__)
        clone.__qualname__ = fn.__qualname__
        memo[id(fn)] = clone
        cells.extend(zip(fn.__closure__ or (), fresh or (), strict=True))
    for fn in functions:
        clone = memo[id(fn)]
        clone.__defaults__ = copy.deepcopy(fn.__defaults__, memo)
        clone.__kwdefaults__ = copy.deepcopy(fn.__kwdefaults__, memo)
    for old, fresh in cells:
        try:
            fresh.cell_contents = copy.deepcopy(old.cell_contents, memo)
        except ValueError:
            pass
    new.__dict__.update(copy.deepcopy(model.__dict__, memo))
    for module in new.modules():
        if parametrize.is_parametrized(module):
            _own_class(module)
    return new


class BackboneCopier:
    """A backbone's own `__deepcopy__` (an instance attribute) once a DeltaModel wraps it.

    Users keep the `model` they attached to, and `best = copy.deepcopy(model)` copied its modules but not
    the deltas acting on them through hooks: the snapshot's outputs followed the original's deltas as they
    trained on (measured: 0.025 on tiny BERT's logits with LoRA), no error. The copy now carries copies of
    the deltas' hooks and weights, so it keeps the outputs it had when it was taken; its `parameters()`
    are the backbone's (the deltas' are the DeltaModel's, as on the original)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, memo: dict[int, Any]) -> nn.Module:
        return deep_copy(self.module, memo)


def _own_class(module: nn.Module) -> None:
    """Give a copied parametrized module a class of its own, as torch gives each parametrized module.

    torch puts a parametrized tensor's property on a class made for that one module, and removing the
    last parametrization deletes the property from that class; a deep copy shares the class, so the
    copy's `detach()` took the original's `bias` away with its own.
    """
    cls = type(module)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)
