"""Shared by the test_errors_*.py files: a saved delta to tamper with, and checks that nothing changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny import make_model, same_state, state

import deltatune as dt
from deltatune.core import io
from deltatune.core.io import META, WEIGHTS

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _no_trace(model: torch.nn.Module) -> bool:
    """No hook and no parametrization left on the backbone."""
    return not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "parametrizations") for m in model.modules())


def _perturbed(dm: dt.DeltaModel, name: str = "default", seed: int = 0) -> dt.DeltaModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta(name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return dm


def _saved(tmp_path: Path, method: str = "lora", **kwargs: object) -> Path:
    dm = _perturbed(dt.attach(make_model("bert"), dt.METHODS[method](), train_head=False))
    dm.save_delta(tmp_path / "d", **kwargs)
    return tmp_path / "d"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_meta(folder: Path, edit, reseal: bool = True) -> None:  # noqa: ANN001 - a function of the parsed JSON
    """Edit delta.json; `reseal` also updates its recorded hash, as a deliberate attacker would, so the
    checks behind the seal are what must refuse the edit."""
    meta = json.loads((folder / META).read_text())
    edit(meta)
    (folder / META).write_bytes(io._sealed(meta) if reseal else json.dumps(meta).encode())


def _rewrite_tensors(folder: Path, edit, rehash: bool = True) -> None:  # noqa: ANN001
    """Edit the tensors and (as a deliberate attacker would) the recorded hash too."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))
    if rehash:
        digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
        _edit_meta(folder, lambda m: m.update(weights_sha256=digest))


def _refused_load(folder: Path, match: str, model: torch.nn.Module | None = None) -> None:
    """Loading `folder` raises DeltaIOError matching `match`; the model and the folder are untouched."""
    model = model if model is not None else make_model("bert")
    before, files = state(model), _files(folder)
    with pytest.raises(dt.DeltaIOError, match=match):
        dt.load_delta(model, folder)
    assert same_state(before, state(model)) and _no_trace(model)
    assert _files(folder) == files
