"""What a backbone carries while deltas act on it, so that the `model` users keep stays honest.

`dm = dt.attach(model, ...)` leaves `model` in the user's hands, with the deltas acting on it through
hooks that its own methods do not know of. Three things went wrong without a word (each measured on
tiny BERT with a trained LoRA):
- `best = copy.deepcopy(model)` shared the hooks: the snapshot followed the original's training (0.025);
- `model.save_pretrained(dir)` wrote the backbone without the deltas (reloaded: 4e-4 off with LoRA,
  0.019 with prefix tuning; BitFit's biases came back re-initialised);
- a second `dt.attach(model, ...)` (a notebook cell run twice) gave a DeltaModel whose outputs included
  the first one's trained LoRA, absent from its parameters, tree and saves.
So while a delta is attached the backbone carries instance attributes: its own `__deepcopy__` (copies
the deltas with it), a `save_pretrained` that refuses and names the calls that keep the deltas, and a
weak reference to its DeltaModel, which a second DeltaModel finds and refuses, and a gate on its own calls
(`traffic.Gate`: `model(...)` waits while another thread's routed batch holds the deltas). The last `detach()`
removes them: the backbone is as it came.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from torch import nn

from . import called, traffic
from .copying import BackboneCopier
from .delta import DeltaError

if TYPE_CHECKING:
    from .model import DeltaModel

OWNER = "_deltatune_owner"

SAVE_REFUSED = (
    "save_pretrained of this model would write it without its deltas, which act through hooks: save the deltas "
    "with dm.save_pretrained(folder) (DeltaModel.from_pretrained(model, folder) loads them), or a plain model with "
    "them merged with dm.export_merged(folder); the bare backbone: dm.export_merged(folder) with every delta "
    "disabled (dm.disable(name)), or dm.detach() first"
)


def owner(backbone: nn.Module) -> DeltaModel | None:
    """The DeltaModel whose deltas act on `backbone` (None: none, or it is gone)."""
    ref = vars(backbone).get(OWNER)
    return ref() if ref is not None else None


class SaveRefused:
    """The backbone's `save_pretrained` (and so `push_to_hub`'s) while deltas are attached."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise DeltaError(SAVE_REFUSED)


class ResizeGuard:
    """The backbone's `resize_token_embeddings` while deltas are attached: refused where a delta acts on the input
    or output embeddings. transformers writes the new table into `weight.data`, which a specification delta's
    parametrized view throws away: the table kept its rows without an error, and a new token id failed inside
    torch (BERT), or the LM head grew and the embeddings did not (Llama). Elsewhere the resize runs as it is."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        backbone = self.backbone
        dm = owner(backbone)
        tables = {id(m) for m in (backbone.get_input_embeddings(), backbone.get_output_embeddings()) if m is not None}
        names = {n for n, m in backbone.named_modules() if id(m) in tables}
        on = [f"{n!r} ({d.config.method})" for n, d in (dm.deltas.items() if dm else ()) if set(d.sites) & names]
        if on:
            raise DeltaError(
                f"resize_token_embeddings with delta(s) {', '.join(on)} on the embeddings: the resized table would not "
                "carry them (and a reparametrized table would keep its old size); resize before attaching, or detach "
                "the delta, resize, and attach it again"
            )
        return type(backbone).resize_token_embeddings(backbone, *args, **kwargs)


class PlainLoad:
    """The backbone's `load_state_dict` while deltas are attached: a plain checkpoint's `X.bias` is loaded into
    `X.parametrizations.bias.original` where a specification delta (BitFit, layernorm, diff pruning, ...)
    reparametrizes it. Before, `model.load_state_dict(checkpoint)` after attaching failed in torch's "Missing
    key(s) ... parametrizations.bias.original" (LoRA, which parametrizes nothing, loaded)."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    def __call__(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        dm = owner(self.backbone)
        merged = [n for n, d in (dm.deltas.items() if dm is not None else ()) if d.merged]
        if merged:
            raise DeltaError(
                f"load_state_dict into a model with delta(s) {', '.join(merged)} merged into its weights: the loaded "
                f"weights would replace them and unmerging would then subtract from the new ones; unmerge first "
                f"(dm.unmerge({merged[0]!r}))"
            )
        own = set(self.backbone.state_dict())
        renamed = {}
        for key, value in state_dict.items():
            module, _, param = key.rpartition(".")
            original = f"{module}.parametrizations.{param}.original" if module else f"parametrizations.{param}.original"
            renamed[original if key not in own and original in own else key] = value
        return type(self.backbone).load_state_dict(self.backbone, renamed, strict=strict, assign=assign)


def _savers(backbone: nn.Module) -> list[nn.Module]:
    """The backbone and every module inside it whose class saves it (`save_pretrained`): a model inside another
    (`model.bert`, a sentence-transformers model's transformer, whose `st.save(dir)` calls it) saves the weights
    the deltas act on just as the backbone's own would, without them."""
    return [m for m in backbone.modules() if m is backbone or callable(getattr(type(m), "save_pretrained", None))]


def mark(backbone: nn.Module, dm: DeltaModel) -> None:
    """Called when a delta is attached (again harmless)."""
    found = vars(backbone)
    found.setdefault("__deepcopy__", BackboneCopier(backbone))
    for module in _savers(backbone):
        vars(module).setdefault("save_pretrained", SaveRefused())
    if callable(getattr(type(backbone), "resize_token_embeddings", None)):
        found.setdefault("resize_token_embeddings", ResizeGuard(backbone))
    found.setdefault("load_state_dict", PlainLoad(backbone))
    called.guard(backbone)  # a wrapper that calls its model's forward directly still runs the deltas' hooks
    traffic.gate(backbone, dm._traffic)  # `model(...)` itself waits beside another thread's routed batch
    found[OWNER] = weakref.ref(dm)


def unmark(backbone: nn.Module) -> None:
    """Called when the last delta is gone."""
    found = vars(backbone)
    if isinstance(found.get("__deepcopy__"), BackboneCopier):
        del found["__deepcopy__"]
    for module in _savers(backbone):
        if isinstance(vars(module).get("save_pretrained"), SaveRefused):
            del vars(module)["save_pretrained"]
    for attr, kind in (("resize_token_embeddings", ResizeGuard), ("load_state_dict", PlainLoad)):
        if isinstance(found.get(attr), kind):
            del found[attr]
    called.unguard(backbone)
    traffic.ungate(backbone)
    found.pop(OWNER, None)


def check_free(backbone: nn.Module) -> None:
    """Refuse a second DeltaModel on a backbone whose deltas another one (or none, any more) holds."""
    ref = vars(backbone).get(OWNER)
    if ref is None:
        return
    owner = ref()
    if owner is not None and owner.backbone is backbone and len(owner.deltas):
        held = ", ".join(f"{n!r} ({d.config.method})" for n, d in owner.deltas.items())
        raise DeltaError(
            f"this model already carries deltas of another DeltaModel ({held}), which a second one would run "
            "unseen (in its outputs, not in its parameters, tree or saves): add to that one with "
            "dm.add(name, config) or dt.attach(dm, config, name=...), or remove them with dm.detach() first "
            "(a notebook cell run twice: detach, or reload the model)"
        )
    raise DeltaError(
        "this model carries deltas whose DeltaModel is gone (a deep copy of a model with deltas attached, or a "
        "DeltaModel dropped without detach()), and they act on its outputs: start from a freshly loaded model, "
        "or copy the DeltaModel instead (copy.deepcopy(dm))"
    )


def check_not_peft(backbone: nn.Module) -> None:
    """Refuse a PeftModel, a model with AdapterHub adapters added, and one with PEFT's layers injected (the model
    inside `PeftModel.from_pretrained(...)`): the foreign adapters would act in the outputs, frozen, but be left out
    of the deltas' saves (a reload scores without them). They are their library's to merge or remove first."""
    if type(backbone).__module__.split(".")[0] == "peft":  # its layers are PEFT's, its targets renamed
        raise TypeError(
            f"this is a PEFT {type(backbone).__name__}: attach to the plain transformers model, or bring a saved "
            "PEFT adapter over with deltatune.interop.import_peft(model, folder)"
        )
    held = getattr(getattr(backbone, "adapters_config", None), "adapters", None)  # AdapterHub's (`adapters`)
    if isinstance(held, dict) and held:
        raise TypeError(
            f"this model carries AdapterHub adapters ({', '.join(map(repr, held))}), which would act in the outputs but "
            "be left out of the deltas' saves: merge them (model.merge_adapter(name)) or delete them "
            "(model.delete_adapter(name)) first, or bring a saved one over with deltatune.interop.import_adapterhub"
        )
    for name, module in backbone.named_modules():
        if type(module).__module__.split(".")[0] == "peft":
            raise TypeError(
                f"this model carries PEFT layers ({name} is a {type(module).__module__}.{type(module).__name__}), "
                "which would act in the outputs but be left out of the deltas' saves: fold them in with PEFT's "
                "merge_and_unload() or remove them with unload() first, or bring a saved PEFT adapter over with "
                "deltatune.interop.import_peft(model, folder)"
            )
