"""`save_pretrained` / `from_pretrained` / `merge_and_unload` of a DeltaModel, under the names transformers and
PEFT users call: every delta as a delta folder (one, or one subfolder each with an index), never the backbone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import atomic
from .io import META, OPENDELTA_HINT, WEIGHTS, DeltaIOError, default_include_head, is_opendelta, load_into, save_delta
from .merge import merged_state_dict
from .reload import INDEX, INDEX_FORMAT, read_index
from .state import TRAINER_STATE_HINT

if TYPE_CHECKING:
    from .model import DeltaModel


def _place(src: Path, dest: Path) -> None:
    """Move `src` to `dest`, replacing a file or folder there in one rename (the old one removed after)."""
    if dest.is_dir() and not dest.is_symlink() or src.is_dir():
        atomic.swap_in(src, dest)
    else:
        os.replace(src, dest)


def save_pretrained(
    dm: DeltaModel,
    path: str | os.PathLike,
    include_head: bool | None = None,
    is_main_process: bool | None = None,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
    **passed: Any,
) -> Path | None:
    """Write every delta (or those `selected_adapters` names) and the task head into `path`, beside whatever
    else is there (a tokenizer).

    What scripts pass to a transformers or PEFT model's save_pretrained is accepted where it changes nothing
    here: `safe_serialization` (the tensors are always safetensors, never a pickle), `save_function`
    (transformers' `*_no_trainer` scripts pass `accelerator.save`), `max_shard_size` (a delta is one file),
    `push_to_hub=False` and `token`. Anything else is refused by name rather than ignored.

    One delta: its folder is `path` itself (so `load_delta(path)` reads it too); several: one
    subfolder per name. An index records names, order and which are enabled. Each file is written
    complete under a temporary name and renamed into place; the index comes last.
    """
    if not len(dm.deltas):
        raise ValueError("this DeltaModel has no deltas to save; save the backbone itself with its save_pretrained")
    _check_passed(passed)
    names = list(dm.deltas) if selected_adapters is None else list(selected_adapters)
    if not names or set(names) - set(dm.deltas):
        raise ValueError(f"selected_adapters {names} must name deltas of this model: {', '.join(dm.deltas)}")
    include_head = default_include_head(dm) if include_head is None else include_head
    if is_main_process is False:  # nothing to write; under FSDP2 the shards are gathered with the main process
        for name in names:
            save_delta(dm, path, name, include_head=include_head, is_main_process=False)
        return None
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    single = len(names) == 1
    entries = []
    tmp = Path(tempfile.mkdtemp(prefix=".deltatune-tmp-", dir=path))
    try:
        for name, delta in ((n, dm.deltas[n]) for n in names):
            folder = "." if single else name
            if not single and (name in (".", "..") or os.sep in name or name.startswith(".")):
                raise ValueError(f"delta name {name!r} cannot be a folder name; rename it before save_pretrained")
            save_delta(
                dm,
                tmp / ("single" if single else name),
                name,
                include_head=include_head,
                is_main_process=is_main_process,
            )
            entries.append({"name": name, "folder": folder, "enabled": bool(delta.enabled)})
        index = {"format": INDEX_FORMAT, "deltas": entries, "train_head": bool(dm.train_head)}
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        if single:
            for fname in (WEIGHTS, META):
                _place(tmp / "single" / fname, path / fname)
        else:
            for entry in entries:
                _place(tmp / entry["folder"], path / entry["folder"])
            for fname in (WEIGHTS, META):  # a single delta saved here before: load_delta(path) must not find it
                (path / fname).unlink(missing_ok=True)
        _place(tmp / INDEX, path / INDEX)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_passed(passed: dict[str, Any]) -> None:
    """Refuse save_pretrained keywords that would change what is written; accept those that change nothing."""
    if passed.get("push_to_hub"):
        raise ValueError("push_to_hub is not offered: save the folder, then huggingface_hub.upload_folder(...)")
    if passed.get("state_dict") is not None:
        raise ValueError(
            "state_dict= is not taken: save_pretrained writes the deltas' own tensors (under FSDP2, call it on "
            "every process with is_main_process=...)"
        )
    other = sorted(set(passed) - {"save_function", "max_shard_size", "push_to_hub", "token", "state_dict"})
    if other:
        raise TypeError(
            f"save_pretrained() got {', '.join(map(repr, other))}, which a delta folder has no use for; it takes "
            "include_head, is_main_process, selected_adapters (and ignores save_function, max_shard_size, token)"
        )


def load_pretrained(dm: DeltaModel, path: str | os.PathLike, **load_kwargs: Any) -> DeltaModel:
    """Attach every delta `save_pretrained` (or `save_delta`) wrote in `path` to `dm`."""
    path = Path(path)
    if not (path / INDEX).exists():
        if (path / META).exists():
            return load_into(dm, path, **load_kwargs)
        if (path / "adapter_config.json").exists() and '"peft_type"' in (path / "adapter_config.json").read_text(
            errors="replace"
        ):
            hint = "it is a PEFT adapter: load it with deltatune.interop.import_peft(backbone, folder)"
        elif (path / "adapter_config.json").exists():
            hint = (
                "its adapter_config.json is not PEFT's (AdapterHub's `adapters` library?): load it with "
                "deltatune.interop.import_adapterhub(backbone, folder)"
            )
        elif is_opendelta(path):
            hint = OPENDELTA_HINT
        elif (path / "model.safetensors").exists():
            hint = TRAINER_STATE_HINT
        else:
            hint = "save deltas with DeltaModel.save_pretrained(folder)"
        raise DeltaIOError(f"{path} holds no {INDEX} and no {META}: {hint}")
    index = read_index(path)
    for entry in index["deltas"]:
        load_into(dm, path / entry["folder"], entry["name"], enabled=bool(entry.get("enabled", True)), **load_kwargs)
    dm.freeze(bool(index.get("train_head", False)))
    return dm


def merge_and_unload(dm: DeltaModel) -> nn.Module:
    """PEFT's `merge_and_unload`: the plain backbone with every enabled delta folded into its weights."""
    state = merged_state_dict(dm)
    backbone = dm.detach()
    with torch.no_grad():
        backbone.load_state_dict(state, strict=True)
    return backbone
