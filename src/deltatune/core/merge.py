"""Folding deltas into the weights for zero-cost inference, and exporting a plain transformers model.

Merging is each method's own math (`Delta.merge_into`); what is generic lives here: merge every
active delta, read the backbone's weights under their original names, put everything back. The
exported folder loads with `from_pretrained` and no deltatune at all.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from .atomic import clean_stale, replacing_folder
from .delta import Delta, DeltaError
from .layers import check_in_memory, is_quantized, stored_weight
from .sharded import refuse_merge
from .targeting import plain_name

if TYPE_CHECKING:
    from .model import DeltaModel


def non_commuting_sites(a: Delta, b: Delta) -> list[str]:
    """The modules both deltas act on where their order matters: none when both only add to the weights."""
    if type(a.config).merge_adds and type(b.config).merge_adds:
        return []
    return sorted(set(a.sites) & set(b.sites))


def check_commutes(deltas: dict[str, Delta], name: str, action: str, merged_only: bool = False) -> None:
    """Refuse a merge (or, `merged_only`, switching a delta on beside merged ones) whose outputs would not be
    the unmerged ones.

    Merging folds a delta into the weights at one point of the module's computation; another delta acting on
    the same module unmerged then sees (or skips) that change in another order than before. For deltas that
    add to the weights (`merge_adds`) the order does not matter; otherwise it does: OFT + LoRA on attn.v gave
    logits 2e-3 to 3e-3 off (10^-1 logits), LoRA + DoRA 7e-4 to 3e-3, (IA)^3 after LoRA 3e-4, no error.
    With this guard, deltas merged into one module all add to its weights, so they unmerge in any order
    (an unmerge-order guard that held non-commuting merges to the reverse order has nothing left to hold).
    """
    delta = deltas[name]
    for other_name, other in deltas.items():
        if other_name == name or not (other.merged if merged_only else other.enabled or other.merged):
            continue
        shared = non_commuting_sites(delta, other)
        if shared:
            odd = other if not type(other.config).merge_adds else delta
            raise DeltaError(
                f"cannot {action}: {other_name!r} ({other.config.method}) also acts on {shared[0]}"
                f"{f' and {len(shared) - 1} more' if len(shared) > 1 else ''}, and {odd.config.method} does not "
                "commute with another delta there, so merged outputs would differ from the unmerged ones; serve "
                f"them unmerged, or disable {other_name!r} while {name!r} is merged (dm.disable({other_name!r}))"
            )


def merge_in(dm: DeltaModel, name: str, undoable: bool) -> None:
    """Fold one delta into the weights, after the checks that keep the outputs those of the unmerged model.

    `undoable`: refuse a delta whose merge could not be taken out again (an (IA)^3 scale of 0); exporting
    (`merged_state_dict`) puts the exact tensors back itself, so it merges those too.
    """
    delta = dm._get(name)
    if delta.merged:
        raise DeltaError(f"delta {name!r} is already merged")
    if not delta.enabled:  # merged, it would act on every input while listed as off
        raise DeltaError(f"delta {name!r} is disabled; enable it before merging (dm.enable({name!r}))")
    check_commutes(dict(dm.deltas), name, f"merge {name!r}")
    refuse_merge(dm, f"merge {name!r}")  # before the checks below, which would take a shard for quantized or tied
    check_in_memory(dm.backbone)  # dispatched with offloading after attaching: no weights to merge into
    check_not_quantized(dm.backbone, delta, name)
    check_not_tied(dm.backbone, delta, name)
    if any(p.is_floating_point() and not p.isfinite().all() for p in delta.parameters()):
        raise DeltaError(f"delta {name!r} holds NaN or infinite values; merging would write them into the weights")
    refusal = delta.unmerge_refusal() if undoable else None
    if refusal:
        raise DeltaError(
            f"delta {name!r} is not merged: {refusal}; merge_and_unload() folds it in for good if that is meant"
        )
    undo = _low_precision_tensors(dm.backbone, delta) if undoable else {}
    delta._undo = {key: tensor.detach().clone() for key, tensor in undo.items()}
    delta._merge_dtypes = {k: t.dtype for k, t in _site_tensors(dm.backbone, delta).items() if t.is_floating_point()}
    delta._merge_seq = next(_MERGE_SEQ)
    delta.merge_into(dm.backbone)
    delta.merged = True


def check_not_quantized(backbone: nn.Module, delta: Delta, name: str) -> None:
    """Refuse a merge into quantized weights (torchao's tensor subclasses): they take no in-place arithmetic,
    and torch failed inside the merge with "Int8Tensor dispatch: attempting to run unimplemented operator"."""
    writes = getattr(delta, "merge_writes", None)  # a method that merges into some parameters says which
    for (site, pname), tensor in _site_tensors(backbone, delta).items():
        if is_quantized(tensor) and (writes is None or pname in writes):
            raise DeltaError(
                f"cannot merge {name!r}: {site}.{pname} is quantized ({type(tensor).__name__}), and a merge cannot "
                "write into quantized weights; serve the delta unmerged, or save it (dm.save_delta) and load it onto "
                "the model loaded without quantization (dt.load_delta(model, folder)), then merge or export_merged "
                "there (and quantize that)"
            )


def check_not_tied(backbone: nn.Module, delta: Delta, name: str) -> None:
    """Refuse a merge that would write a tensor another module also holds, unless the delta acts there too.

    GPT-2's lm_head is tied to wte: LoRA merged into lm_head changed the embeddings as well (logits 35 off
    the unmerged ones on tiny GPT-2, no error). A delta that reparametrizes every holder of the tensor
    (selective, BitFit, diff pruning) changes them all unmerged too, so its merge is exact.
    """
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in backbone.named_modules():
        if isinstance(module, parametrize.ParametrizationList):  # its `original` is listed under its owner
            continue
        pnames = list(module._parameters) + list(getattr(module, "parametrizations", {}).keys())
        for pname in pnames:
            if isinstance(tensor := stored_weight(module, pname), torch.Tensor):
                holders.setdefault(id(tensor), []).append((mname, module, pname))
    hooks = delta._hooks
    covered = {(id(m), p) for m, p in hooks._params} if hooks is not None else set()
    for (site, pname), tensor in _site_tensors(backbone, delta).items():
        held = holders.get(id(tensor), [])
        others = [f"{m}.{p}" for m, mod, p in held if m != site and (id(mod), p) not in covered]
        if others:
            raise DeltaError(
                f"cannot merge {name!r}: {site}.{pname} is also held by {others[0]} (tied weights), which "
                f"{delta.config.method} does not act on, so merging would change it too and the outputs "
                "would differ from the unmerged ones; serve the delta unmerged, or target modules whose "
                "weights are their own"
            )


def check_head_load(dm: DeltaModel, head: Iterable[str]) -> None:
    """Refuse loading head tensors under a merged delta acting on the head: unmerging would then put back the
    head as it was before that merge (a half-precision merge's copy) or subtract from the loaded one."""
    modules = {n.rsplit(".", 1)[0] for n in head}
    for name, delta in dm.deltas.items():
        hit = [s for s in delta.sites if delta.merged and any(s == m or s.startswith(m + ".") for m in modules)]
        if hit:
            raise DeltaError(
                f"cannot load the head's tensors: delta {name!r} is merged into {hit[0]}, and unmerging it would "
                f"then overwrite them; unmerge it first (dm.unmerge({name!r}))"
            )


# Merging in half precision rounds W + dW, so subtracting dW again leaves W up to 1e-3 off (bf16 LoRA,
# measured on tiny BERT; PEFT's unmerge drifts so too, and more with every cycle). A merge there keeps
# the weights it changes (memory: those weights once more) and unmerging puts them back bitwise;
# float32 merges subtract (1e-7).
_MERGE_SEQ = itertools.count()


def _site_tensors(backbone: nn.Module, delta: Delta) -> dict[tuple[str, str], torch.Tensor]:
    """Every tensor a merge of `delta` may write: its site modules' own parameters (the parametrizations'
    originals where a specification delta reparametrizes them)."""
    out = {}
    for site in delta.sites:
        module = backbone.get_submodule(site)
        names = [n for n, _ in module.named_parameters(recurse=False)]
        names += list(getattr(module, "parametrizations", {}).keys())
        for pname in names:
            out[(site, pname)] = stored_weight(module, pname)
    return out


def merged_tensors(dm: DeltaModel) -> set[str]:
    """Plain names of the backbone tensors that the merged deltas have written into."""
    return {f"{site}.{pname}" for d in dm.deltas.values() if d.merged for site, pname in _site_tensors(dm.backbone, d)}


def _low_precision_tensors(backbone: nn.Module, delta: Delta) -> dict[tuple[str, str], torch.Tensor]:
    tensors = _site_tensors(backbone, delta)
    return {k: t for k, t in tensors.items() if t.is_floating_point() and t.element_size() < 4}


def _warn_if_cast(dm: DeltaModel, delta: Delta, name: str) -> None:
    """A merge in float32 followed by a cast to bfloat16 (`dm.to(torch.bfloat16)`) leaves weights that hold the
    delta rounded to the new precision: the subtraction gives the base back only to that rounding (LoRA: 7e-4
    off the bfloat16 base), where an unmerge is otherwise bitwise or 1e-6. Said, not silent."""
    now = _site_tensors(dm.backbone, delta)
    cast = sorted({(str(dtype), str(now[k].dtype)) for k, dtype in getattr(delta, "_merge_dtypes", {}).items()
                   if k in now and now[k].dtype != dtype})  # fmt: skip
    if cast:
        before, after = cast[0]
        warnings.warn(
            f"delta {name!r} was merged into {before.removeprefix('torch.')} weights that are now "
            f"{after.removeprefix('torch.')}: unmerging gives the base back only to within that precision's rounding "
            "(unmerge before casting, or cast the model before merging, to get it back exactly)",
            stacklevel=5,
        )


def unmerge_out(dm: DeltaModel, name: str) -> None:
    """Take a merged delta out of the weights: its method's inverse, then, for a half-precision merge, the
    weights as they were before it, bitwise, unless a delta merged later still changes the same tensors
    (then the subtraction stands, and that later delta's own copy, taken with this one merged, is dropped)."""
    delta = dm._get(name)
    if not delta.merged:
        raise DeltaError(f"delta {name!r} is not merged; nothing to unmerge")
    refuse_merge(dm, f"unmerge {name!r}")
    _warn_if_cast(dm, delta, name)
    delta.unmerge_from(dm.backbone)
    delta.merged = False
    undo, delta._undo = delta._undo, {}
    if not undo:
        return
    later = [d for d in dm.deltas.values() if d.merged and getattr(d, "_merge_seq", -1) > delta._merge_seq]
    shared = [d for d in later if set(_site_tensors(dm.backbone, d)) & set(undo)]
    if shared:
        for d in shared:
            d._undo = {}
        return
    now = _site_tensors(dm.backbone, delta)
    with torch.no_grad():
        for key, before in undo.items():
            if key in now and now[key].shape == before.shape:
                now[key].copy_(before)


def merged_state_dict(dm: DeltaModel) -> dict[str, torch.Tensor]:
    """The backbone's state dict with every enabled delta folded in; the DeltaModel is left as it was."""
    check_in_memory(dm.backbone)
    refuse_merge(dm, "export a merged model")
    active = [n for n, d in dm.deltas.items() if d.enabled and not d.merged]
    refused = [f"{n} ({dm.deltas[n].config.method})" for n in active if not dm.deltas[n].config.can_merge]
    if refused:
        raise DeltaError(
            f"cannot export a merged model: {', '.join(refused)} add computation that no weight change expresses; "
            "disable or detach them (dm.disable(name)) to export the rest, or save the delta with save_delta"
        )
    # unmerge undoes merge only to rounding (e.g. (IA)^3 divides), or not at all (an (IA)^3 scale of 0);
    # exporting must change nothing, so the exact tensors are put back afterwards
    original = {k: v.detach().clone() for k, v in dm.backbone.state_dict().items()}
    before = {plain_name(k) for k in original}
    done = []
    try:
        for name in active:
            merge_in(dm, name, undoable=False)
            done.append(name)
        state = {plain_name(k): v.detach().clone() for k, v in dm.backbone.state_dict().items()}
    finally:
        for name in reversed(done):
            if dm.deltas[name].unmerge_refusal() is None:
                dm.unmerge(name)  # also takes away what a merge added (BitFit's new biases)
            else:
                dm.deltas[name].merged = False
        current = dm.backbone.state_dict()
        with torch.no_grad():
            for k, v in original.items():
                current[k].copy_(v)
    extra = sorted(set(state) - before)
    if extra:
        raise DeltaError(
            f"merging created tensors the architecture has no place for ({', '.join(extra[:4])}, ...): "
            "from_pretrained would drop them; e.g. BitFit's added biases on a model without biases"
        )
    return state


def export_merged(dm: DeltaModel, path: str | os.PathLike, tokenizer: object | None = None) -> Path:
    """Write a plain transformers model folder with the deltas merged in (atomically)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; choose a new folder for the merged model")
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; choose a new folder for the merged model")
    save = type(dm.backbone).save_pretrained  # the class's: core.marks refuses the instance's
    if "state_dict" in inspect.signature(save).parameters:  # transformers': the merged tensors under the weights' names
        backbone, kwargs = dm.backbone, {"state_dict": merged_state_dict(dm)}
    else:  # a model wrapping one (sentence-transformers saves its modules in turn): a merged copy, saved whole
        backbone, kwargs = copy.deepcopy(dm).merge_and_unload(), {}
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)  # temp folders of exports that were killed midway
    with replacing_folder(path) as tmp:  # `path` is missing or empty (checked above)
        save(backbone, tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path
