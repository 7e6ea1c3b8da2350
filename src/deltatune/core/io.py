"""Saving and loading a delta alone: `delta.safetensors` (its tensors) + `delta.json` (everything else).

A delta is only meaningful on the backbone it was trained on, so the JSON carries the backbone's
identity (`core.identity`), the SHA-256 of the tensor file, so that a flipped byte is refused
instead of silently changing outputs, and a SHA-256 of its own content (`meta_sha256`), so that an
edit that still parses (alpha 16 -> 32: the same tensors, other outputs) is refused too; a deliberate
edit is sealed again with `deltatune reseal PATH` (`reseal`). A file may hold only the keys its delta defines, plus task
head keys where delta.json declares a head: nothing in a file can write any other backbone weight.
Writes never leave half a delta and never delete files they did not write (`core.atomic`). Only
safetensors and JSON are ever read, with bounded sizes; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..version import __version__
from . import atomic, identity, order, sharded
from .delta import DeltaConfig, DeltaIOError
from .seal import _MAX_DEPTH, _MAX_META_BYTES, META, _depth, _read_regular, _sealed, check_seal
from .settings import config_from_dict
from .sites import compact_sites, expand_sites  # noqa: F401 - importable from here as before
from .state import TRAINER_STATE_HINT
from .targeting import HEAD_KEY, head_trains_by_default

if TYPE_CHECKING:
    from .model import DeltaModel

WEIGHTS = "delta.safetensors"
HEAD = HEAD_KEY  # task head tensors are stored under these keys
FORMAT = "deltatune.delta/1"
_warned_unhashed = False


# identity lives in core.identity; these names stay importable from here
fingerprint = identity.fingerprint
_probe_index = identity.probe_index


def check_backbone(saved: dict[str, Any], model: nn.Module) -> None:
    """Refuse a delta made for another backbone, naming both; dtype differences are fine (cast on load)."""
    try:
        identity.check(saved, model)
    except identity.IdentityError as err:
        raise DeltaIOError(str(err)) from None


def _config_from_json(data: Any) -> DeltaConfig:
    try:
        return config_from_dict(data, source="delta.json")
    except (TypeError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise DeltaIOError(f"{message}; was the JSON edited?" if "edited" not in str(message) else message) from None


def saved_config(meta: dict[str, Any]) -> DeltaConfig:
    """The config a saved delta is built from: delta.json's "config" with what `finalize()` changed."""
    finalized = meta.get("finalized") or {}
    if not isinstance(finalized, dict) or not isinstance(meta.get("config"), dict):
        raise DeltaIOError("delta.json's config or finalized entry is not a mapping; was the JSON edited?")
    return _config_from_json({**meta["config"], **finalized})


def default_include_head(dm: DeltaModel) -> bool:
    """Whether a save keeps the task head unless told: when it trains, or when it is new for the task
    (`head_trains_by_default`); a frozen pretrained LM head comes from the backbone itself."""
    return bool(dm.train_head) or head_trains_by_default(dm.backbone)


def save_delta(
    dm: DeltaModel,
    path: str | os.PathLike,
    name: str = "default",
    *,
    include_head: bool | None = None,
    is_main_process: bool | None = None,
    **metadata: Any,
) -> Path | None:
    """Write one named delta (tensors + config + backbone identity) to a folder, atomically.

    `include_head` adds the task head (a trained classifier is part of what a classification delta
    needs at inference), stored under `__head__.` keys; by default, when the head trains or is new for
    the task: a frozen random classifier shapes the outputs too, and each load draws another one.
    `is_main_process` (given on every process of a launch): only the main one writes; under FSDP2 every process
    gathers the shards with it (`core.sharded`).
    """
    include_head = default_include_head(dm) if include_head is None else include_head

    delta = dm.delta(name)
    if delta.merged:
        raise DeltaIOError(f"delta {name!r} is merged into the weights; unmerge it before saving")
    gather = sharded.check_save(dm, name, is_main_process)
    if is_main_process is False and not gather:
        return None
    state = dm.delta_state_dict(name, include_head=include_head)
    tensors = {k: sharded.full(v).detach().contiguous().cpu() for k, v in state.items()}
    whole = [(n, sharded.full(p)) for n, p in identity.base_parameters(dm.backbone)] if gather else None
    meta = {
        "format": FORMAT,
        "name": name,
        "config": delta.config.to_dict(),
        "finalized": delta.finalized,  # settings finalize() changed; loading builds the config with them
        "family": delta.config.family,
        "sites": compact_sites(delta.sites),
        "after": order.before(dm, name),  # deltas before it on its modules it does not commute with (core.order)
        "num_parameters": sum(v.numel() for k, v in tensors.items() if not k.startswith(HEAD)),
        "head_parameters": sum(v.numel() for k, v in tensors.items() if k.startswith(HEAD)),
        "backbone": fingerprint(dm.backbone, whole),
        "deltatune_version": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metadata": metadata,
    }
    return None if is_main_process is False else write_delta_folder(path, tensors, meta)


def write_delta_folder(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors + delta.json (with the tensors' content hash) into a folder, atomically. One writer for
    every folder deltatune saves (deltas, head-only runs), so each carries the hash that loading checks."""
    from safetensors.torch import save

    path = Path(path)
    atomic.recover(path, [WEIGHTS, META])  # an earlier save of this folder that was cut short
    if path.exists() and (not path.is_dir() or not (path / META).exists() and any(path.iterdir())):
        raise DeltaIOError(f"{path} exists and is not a delta folder; choose another path")
    data = save(tensors, metadata={"format": "pt"})
    meta = {**meta, "weights_sha256": hashlib.sha256(data).hexdigest()}
    atomic.write_folder(path, {WEIGHTS: data, META: _sealed(meta)})
    return path


def reseal(path: str | os.PathLike) -> Path:
    """Accept a deliberately edited delta.json: check it as loading does, then record its new hash.

    The tensors must still match their recorded SHA-256 (resealing vouches for an edited description,
    never for a changed tensor file), and the config must still be valid.
    """
    path = Path(path)
    meta = read_meta(path)
    _config_from_json(meta["config"]) if meta["config"].get("method") != "head" else None
    raw = json.loads(_read_regular(path / META, _MAX_META_BYTES, "save the delta again").decode("utf-8"))
    data = _read_regular(path / WEIGHTS, None, "save the delta again")
    expected = raw.get("weights_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise DeltaIOError(
            f"{path / WEIGHTS} does not match its recorded SHA-256; resealing covers delta.json only: "
            "restore the tensor file or save the delta again"
        )
    raw["weights_sha256"] = hashlib.sha256(data).hexdigest()
    atomic.write_folder(path, {META: _sealed(raw)})
    return path


OPENDELTA_HINT = "it is an OpenDelta checkpoint: load it with deltatune.interop.import_opendelta(backbone, folder)"


def is_opendelta(path: str | os.PathLike) -> bool:
    """OpenDelta's `save_finetuned` folder: a config.json (at most 1 MiB) with `delta_type` and `backbone_class`.
    Here, not in `interop`, so that the loaders' refusals can name `import_opendelta` (interop reads core)."""
    config = Path(path) / "config.json"
    if not config.is_file() or config.stat().st_size > 1 << 20:
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "delta_type" in data and "backbone_class" in data


def _format_version(file: Path, meta: dict[str, Any]) -> str | None:
    """Why another release's "deltatune.delta/<N>" is refused (None: not one); it read as a corrupted file."""
    prefix, _, ours = FORMAT.rpartition("/")
    fmt = meta.get("format")
    number = fmt.removeprefix(f"{prefix}/") if isinstance(fmt, str) and fmt.startswith(f"{prefix}/") else ""
    if not (number.isascii() and number.isdigit() and len(number) < 10) or int(number) == int(ours):
        return None
    release = meta.get("deltatune_version")
    known = isinstance(release, str) and release != __version__ and re.fullmatch(r"\d[\w.+-]{0,30}", release)
    by = f" (saved by deltatune {release})" if known else ""
    if int(number) > int(ours):
        fix = f"reads {FORMAT!r}: upgrade deltatune (pip install -U deltatune)"
        return f"{file} was written by a newer deltatune in format {fmt!r}{by}; this deltatune {__version__} {fix}"
    fix = f"reads only {FORMAT!r}: load it with the deltatune release that saved it, or train the delta again"
    return f"{file} is in the older format {fmt!r}{by}; this deltatune {__version__} {fix}"


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """delta.json, parsed within bounds (size, nesting, site ranges) before anything is allocated from it."""
    path = Path(path)
    atomic.recover(path, [WEIGHTS, META])
    file = path / META
    if not file.exists() and not file.is_symlink():
        if not path.exists():
            raise DeltaIOError(f"{path}: no such folder; pass the folder save_delta wrote (it holds {META})")
        if (path / "adapter_config.json").exists():
            raise DeltaIOError(
                f"{path} is a PEFT or AdapterHub adapter: load it with deltatune.interop.import_peft(backbone, folder) "
                "or import_adapterhub(backbone, folder)"
            )
        if (path / "deltatune_model.json").exists():
            raise DeltaIOError(
                f"{path} holds several deltas (save_pretrained): load it with DeltaModel.from_pretrained"
            )
        if is_opendelta(path):
            raise DeltaIOError(f"{path} is not a delta folder: {OPENDELTA_HINT}")
        if (path / "model.safetensors").exists():
            raise DeltaIOError(f"{path} is not a delta folder: {TRAINER_STATE_HINT}")
        hint = " (it holds a delta.safetensors but no delta.json)" if (path / WEIGHTS).exists() else ""
        raise DeltaIOError(f"{path} is not a delta folder: no {META}{hint}; save deltas with DeltaModel.save_delta")
    data = _read_regular(file, _MAX_META_BYTES, "save deltas with DeltaModel.save_delta")
    try:
        meta = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise DeltaIOError(f"{file} is nested far deeper than a delta description; was it edited?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaIOError(f"{file} is not valid JSON ({err}); was it edited by hand or cut short?") from err
    if _depth(meta) > _MAX_DEPTH:
        raise DeltaIOError(
            f"{file} is nested deeper than {_MAX_DEPTH} levels, unlike any delta description; was it edited?"
        )
    if isinstance(meta, dict) and meta.get("format") != FORMAT and (version := _format_version(file, meta)):
        raise DeltaIOError(version)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise DeltaIOError(f"{file} is not a deltatune delta description (format {FORMAT!r} expected)")
    if not isinstance(meta["config"], dict):
        raise DeltaIOError(f"{file}: 'config' is not a mapping of settings; was the JSON edited?")
    if isinstance(meta.get("sites"), dict):
        meta["sites"] = expand_sites(meta["sites"])
    elif meta.get("sites") is not None:
        raise DeltaIOError(f"{file}: 'sites' is not a mapping of module names; was the JSON edited?")
    return meta


def read_tensors(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The delta's tensors, verified against the SHA-256 that delta.json recorded at save time."""
    global _warned_unhashed
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = read_meta(path) if meta is None else meta
    file = Path(path) / WEIGHTS
    if not file.exists() and not file.is_symlink():
        raise DeltaIOError(f"{file} is missing; the delta folder is incomplete")
    data = _read_regular(file, None, "the delta folder is incomplete: save the delta again")
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaIOError(f"{file} is truncated or corrupted ({err}); save the delta again") from err
    expected = meta.get("weights_sha256")
    if expected is None:
        if not _warned_unhashed:
            _warned_unhashed = True
            warnings.warn(
                f"{Path(path) / META} records no hash of its tensors (written before deltatune checked them), so a "
                "corrupted file cannot be detected; save the delta again to add one",
                stacklevel=3,
            )
    elif hashlib.sha256(data).hexdigest() != expected:
        raise DeltaIOError(
            f"{file} is corrupted or edited: its content does not match the SHA-256 recorded when it was saved; "
            "restore it from a backup or save the delta again"
        )
    check_seal(path)
    return tensors


def load_into(
    dm: DeltaModel,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    strict_backbone: bool = True,
    enabled: bool = True,
    head: bool = True,
) -> DeltaModel:
    """Attach a saved delta to `dm` and return it (`core.entry.load_delta` wraps a plain backbone first).

    `head=False` leaves the model's task head as it is (a delta moved to a task with other labels).

    Everything is checked before the model is touched: the backbone's identity, the config, the file; the
    tensors are cast to the backbone's dtype and device. `enabled=False` attaches it switched off, to serve
    several deltas that change the same parameters (routing picks per row)."""
    meta = read_meta(path)
    if isinstance(meta.get("config"), dict) and meta["config"].get("method") == "head":
        raise DeltaIOError(
            f"{path} holds a trained task head and no delta (a head-only run); load it with "
            "deltatune.train.load_saved(model, path), which also reads deltas"
        )
    config = saved_config(meta)
    tensors = read_tensors(path, meta)
    if not head:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD)}
    if strict_backbone:
        check_backbone(meta.get("backbone", {}), dm.backbone)
    name = name or meta.get("name") or "default"
    if not isinstance(name, str):
        raise DeltaIOError(f"delta.json names the delta {name!r}, not a string; pass name=... or fix the JSON")
    check_one_head(dm, str(path), {k.removeprefix(HEAD): v for k, v in tensors.items() if k.startswith(HEAD)})
    with dm._traffic.routed():  # one switch: another thread's call saw the delta added, its tensors half loaded
        dm.add(name, config, enabled=enabled)
        try:
            _load_into(dm, name, tensors, meta)
        except BaseException:
            dm.detach(name)
            raise
    order.check(dm, name, meta)
    if any(k.startswith(HEAD) for k in tensors):
        dm._head_source = name
    return dm


HEAD_FIX = (
    "load it with head=False if both were trained for one head, or serve deltas with their own heads on separate models"
)


def check_one_head(dm: DeltaModel, source: str, head: dict[str, torch.Tensor], fix: str = HEAD_FIX) -> None:
    """Rows share the backbone's one task head: a second delta's own head would replace the first's,
    and the first delta's rows would be scored by it without a word (deltas served side by side).

    The first may have been loaded with its head, or attached and trained here against the head the
    model holds now: either way its outputs depend on that head. `head`: the new head's tensors by their names
    in the backbone (a saved delta's, or a PEFT adapter's `modules_to_save`)."""
    previous = getattr(dm, "_head_source", None)
    if previous not in dm.deltas:
        previous = next(iter(dm.deltas), None)
    if previous is None:
        return
    params = dict(dm.backbone.named_parameters())
    for k, value in head.items():
        if k in params and params[k].shape == value.shape:
            if not torch.equal(params[k], value.to(dtype=params[k].dtype, device=params[k].device)):
                raise DeltaIOError(
                    f"{source} carries its own task head, but delta {previous!r} brought another and rows share the "
                    f"backbone's one head, so {previous!r} would run with this one: {fix}"
                )


def _load_into(dm: DeltaModel, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    delta = dm.delta(name)
    if meta.get("sites") and set(meta["sites"]) != set(delta.sites):
        missing = sorted(set(meta["sites"]) - set(delta.sites))[:5]
        extra = sorted(set(delta.sites) - set(meta["sites"]))[:5]
        raise DeltaIOError(f"the delta's modules differ on this model: saved-only {missing}, here-only {extra}")
    head = {k.removeprefix(HEAD): v for k, v in tensors.items() if k.startswith(HEAD)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(HEAD)}
    own = delta.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise DeltaIOError(
            f"delta.safetensors does not fit the {delta.config.method} delta: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}"
        )
    bad = [k for k in own if own[k].shape != tensors[k].shape]
    if bad:
        k = bad[0]
        raise DeltaIOError(f"tensor {k!r} has shape {tuple(tensors[k].shape)} in the file, {tuple(own[k].shape)} here")
    if head and not meta.get("head_parameters"):
        raise DeltaIOError(
            f"delta.safetensors holds task head tensors ({sorted(head)[0]!r}, ...) that delta.json does not declare; "
            "the file was edited: restore it or save the delta again"
        )
    params = dict(dm.backbone.named_parameters())
    head_names_here = set(dm.head_parameter_names())
    for k, v in head.items():
        if k not in head_names_here:
            what = "a backbone weight, not its task head" if k in params else "a tensor this model lacks"
            raise DeltaIOError(
                f"the delta carries a task head tensor {k!r}, which names {what}; only the task head may be "
                "loaded from a delta: load a model with that head, or save the delta again"
            )
        if params[k].shape != v.shape:
            raise DeltaIOError(
                f"the delta's head tensor {k!r} has shape {tuple(v.shape)}, this model's {tuple(params[k].shape)}: "
                f"load the backbone with the same number of labels (num_labels={v.shape[0]})"
            )
    nonfinite = next(
        (k for k, v in {**tensors, **head}.items() if v.is_floating_point() and not v.isfinite().all()), None
    )
    if nonfinite is not None:
        raise DeltaIOError(
            f"tensor {nonfinite!r} holds NaN or infinite values: the delta was saved from a run that diverged; "
            "retrain it (a lower --lr) or load an earlier checkpoint"
        )
    cast = {k: v.to(dtype=own[k].dtype, device=own[k].device) for k, v in tensors.items()}
    delta.load_state_dict(cast, strict=True)
    with torch.no_grad():
        for k, v in head.items():
            params[k].copy_(v.to(dtype=params[k].dtype, device=params[k].device))
