"""Saving and loading a delta alone: `delta.safetensors` (its tensors) + `delta.json` (everything else).

A delta is only meaningful on the backbone it was trained on, so the JSON carries the backbone's
identity: a structural hash (parameter names and shapes), the dtypes, and a few fixed weight
values, compared with a tolerance so that a bf16 copy of the same model still matches. Files are
written into a temporary folder and renamed into place: a crash never leaves half a delta. Only
safetensors and JSON are ever read; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .delta import DeltaConfig
from .targeting import head_names

if TYPE_CHECKING:
    from .model import DeltaModel

WEIGHTS, META = "delta.safetensors", "delta.json"
HEAD = "__head__."
FORMAT = "deltatune.delta/1"
_SLICE = 8  # values taken from each probe tensor


class DeltaIOError(ValueError):
    """A delta folder that cannot be loaded onto this model, with what to do about it."""


def _clean(name: str) -> str:
    """A parameter's backbone name, also while a parametrization wraps it."""
    return name.replace(".parametrizations.", ".").replace(".original", "")


def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The backbone's parameters without its task head: a head is per task, often freshly initialised."""
    heads = tuple(f"{h}." for h in head_names(model))
    return sorted((_clean(n), p) for n, p in model.named_parameters() if not (heads and n.startswith(heads)))


def _probe_index(numel: int, count: int) -> torch.Tensor:
    """`count` evenly spread positions in a tensor, in integers (float steps overflow past 2^24)."""
    count = min(count, numel)
    return torch.tensor([i * (numel - 1) // max(count - 1, 1) for i in range(count)], dtype=torch.long)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Who the backbone is: structure hash, dtypes and a few weight values from fixed places."""
    params = _base_parameters(model)
    digest = hashlib.sha256()
    for name, p in params:
        digest.update(f"{name}:{tuple(p.shape)};".encode())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in params})
    probes = {}
    for name, p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().reshape(-1)
        probes[name] = [float(v) for v in flat[_probe_index(flat.numel(), _SLICE)].float().cpu()]
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None),
        "class": type(model).__name__,
        "num_parameters": sum(p.numel() for _, p in params),
        "structure_sha256": digest.hexdigest(),
        "dtypes": dtypes,
        "probes": probes,
    }


def _describe(fp: dict[str, Any]) -> str:
    name = fp.get("name_or_path") or "unnamed"
    return f"{fp.get('class')} ({fp.get('model_type')}, {name}, {fp.get('num_parameters', 0):,} parameters)"


def check_backbone(saved: dict[str, Any], model: nn.Module) -> None:
    """Refuse a delta made for another backbone, naming both; dtype differences are fine (cast on load)."""
    here = fingerprint(model)
    if saved.get("structure_sha256") != here["structure_sha256"]:
        raise DeltaIOError(
            f"this delta was trained on {_describe(saved)} but the model is {_describe(here)}: "
            "their parameter names or shapes differ; load it onto the backbone it was trained on"
        )
    params = dict(_base_parameters(model))
    for name, values in saved.get("probes", {}).items():
        if name not in params:
            raise DeltaIOError(f"delta.json names a backbone parameter {name!r} this model lacks; was the JSON edited?")
        flat = params[name].detach().reshape(-1).float().cpu()
        if len(values) > flat.numel() or not torch.allclose(
            flat[_probe_index(flat.numel(), len(values))], torch.tensor(values), rtol=2e-2, atol=1e-3
        ):
            raise DeltaIOError(
                f"this delta was trained on {_describe(saved)}; the model has the same shapes but other weights "
                f"(e.g. {name!r} differs): it is another checkpoint of the same architecture; load the right one"
            )


def _config_from_json(data: dict[str, Any]) -> DeltaConfig:
    from ..methods import METHODS  # the registry, not any method by name

    method = data.get("method")
    if method not in METHODS:
        raise DeltaIOError(f"delta.json names an unknown method {method!r}; known: {', '.join(METHODS)}")
    cls = METHODS[method]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key not in fields:
            raise DeltaIOError(f"delta.json gives {method} a setting {key!r} it does not have; was the JSON edited?")
        default = fields[key].default
        kwargs[key] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    try:
        config = cls(**kwargs)
        config.validate()
    except (TypeError, ValueError) as err:
        raise DeltaIOError(f"delta.json holds an invalid {method} config: {err}") from err
    return config


def _write_folder(path: Path, files: dict[str, bytes]) -> None:
    """Write files into a fresh temporary folder beside `path`, then swap it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if path.exists():
            if not path.is_dir() or not (path / META).exists() and any(path.iterdir()):
                raise DeltaIOError(f"{path} exists and is not a delta folder; choose another path")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_delta(
    dm: DeltaModel, path: str | os.PathLike, name: str = "default", *, include_head: bool = False, **metadata: Any
) -> Path:
    """Write one named delta (tensors + config + backbone identity) to a folder, atomically.

    `include_head` adds the task head (a trained classifier is part of what a classification delta
    needs at inference), stored under `__head__.` keys.
    """
    from safetensors.torch import save

    from .. import __version__

    delta = dm.delta(name)
    if delta.merged:
        raise DeltaIOError(f"delta {name!r} is merged into the weights; unmerge it before saving")
    tensors = {
        k: v.detach().contiguous().cpu() for k, v in dm.delta_state_dict(name, include_head=include_head).items()
    }
    meta = {
        "format": FORMAT,
        "name": name,
        "config": delta.config.to_dict(),
        "family": delta.config.family,
        "sites": compact_sites(delta.sites),
        "num_parameters": sum(v.numel() for k, v in tensors.items() if not k.startswith(HEAD)),
        "head_parameters": sum(v.numel() for k, v in tensors.items() if k.startswith(HEAD)),
        "backbone": fingerprint(dm.backbone),
        "deltatune_version": __version__,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metadata": metadata,
    }
    path = Path(path)
    _write_folder(
        path,
        {WEIGHTS: save(tensors, metadata={"format": "pt"}), META: json.dumps(meta, separators=(",", ":")).encode()},
    )
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / META).exists():
        hint = " (it holds a delta.safetensors but no delta.json)" if (path / WEIGHTS).exists() else ""
        raise DeltaIOError(f"{path} is not a delta folder: no {META}{hint}; save deltas with DeltaModel.save_delta")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaIOError(f"{path / META} is not valid JSON ({err}); was it edited by hand or cut short?") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise DeltaIOError(f"{path / META} is not a deltatune delta description (format {FORMAT!r} expected)")
    if isinstance(meta.get("sites"), dict):
        meta["sites"] = expand_sites(meta["sites"])
    return meta


_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")
_RANGE = re.compile(r"\{(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)\}")


def compact_sites(sites: dict[str, int]) -> dict[str, int]:
    """Sites that differ only in their first index (the layer) and count the same, as one `a.{0-29}.b` key.

    A delta on a 30-layer model otherwise spends kilobytes of delta.json repeating module names
    (SmolLM2's LoRA: 60 names), which is what kept its folder above the tensors + 16 KiB target.
    """
    groups: dict[tuple[str, int], list[int]] = {}
    out: dict[str, int] = {}
    for name, count in sites.items():
        match = None if "{" in name else _INDEX.search(name)
        if match is None:
            out[name] = count
            continue
        template = name[: match.start()] + "{}" + name[match.end() :]
        groups.setdefault((template, count), []).append(int(match.group(1)))
    for (template, count), indices in groups.items():
        out[template.replace("{}", "{" + _ranges(indices) + "}", 1)] = count
    return out


def expand_sites(sites: dict[str, int]) -> dict[str, int]:
    """The inverse of `compact_sites` (plain names, as older delta.json files store them, pass through)."""
    out: dict[str, int] = {}
    for key, count in sites.items():
        match = _RANGE.search(key)
        if match is None:
            out[key] = count
            continue
        for part in match.group(1).split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                out[key[: match.start()] + str(i) + key[match.end() :]] = count
    return out


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    if not file.exists():
        raise DeltaIOError(f"{file} is missing; the delta folder is incomplete")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaIOError(f"{file} is truncated or corrupted ({err}); save the delta again") from err


def load_delta(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    strict_backbone: bool = True,
    enabled: bool = True,
):
    """Attach a saved delta to `model` (a backbone or a DeltaModel) and return the DeltaModel.

    Everything is checked before the model is touched: the backbone's identity, the config, the
    file; the tensors are cast to the backbone's dtype and device. `enabled=False` attaches it
    switched off, to serve several deltas that change the same parameters (routing picks per row).
    """
    from .model import DeltaModel

    meta = read_meta(path)
    config = _config_from_json(meta["config"])
    tensors = read_tensors(path)
    dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
    if strict_backbone:
        check_backbone(meta.get("backbone", {}), dm.backbone)
    name = name or meta.get("name") or "default"
    dm.add(name, config, enabled=enabled)
    try:
        _load_into(dm, name, tensors, meta)
    except BaseException:
        dm.detach(name)
        raise
    return dm


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
    params = dict(dm.backbone.named_parameters())
    for k, v in head.items():
        if k not in params:
            raise DeltaIOError(
                f"the delta carries a task head tensor {k!r} this model lacks; load a model with that head"
            )
        if params[k].shape != v.shape:
            raise DeltaIOError(
                f"the delta's head tensor {k!r} has shape {tuple(v.shape)}, this model's {tuple(params[k].shape)}: "
                f"load the backbone with the same number of labels (num_labels={v.shape[0]})"
            )
    cast = {k: v.to(dtype=own[k].dtype, device=own[k].device) for k, v in tensors.items()}
    delta.load_state_dict(cast, strict=True)
    with torch.no_grad():
        for k, v in head.items():
            params[k].copy_(v.to(dtype=params[k].dtype, device=params[k].device))
