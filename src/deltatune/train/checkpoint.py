"""Resuming `deltatune train` mid-way: what the loop needs to continue as if never stopped.

At every evaluation the main process writes `<out>/checkpoint/`: the trained tensors (the
DeltaModel's state: deltas + head) and the best ones so far, the optimizer's moments, the
learning-rate schedule and any delta's own schedule (`Delta.schedule_state`, e.g. AdaLoRA's
importance averages), the random states (torch's, for dropout, and the data order's generator as it was when
the current epoch began) and the loop's own counters and curve. Resuming restores all of it and
skips the batches of the current epoch already trained on, so the run reaches the tensors an
uninterrupted run reaches (tested bitwise on CPU). Tensors go to safetensors, everything else to
JSON: nothing is pickled. The folder is written under a temporary name and renamed: a crash
during a save leaves the previous checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import replacing_folder

FOLDER, TENSORS, STATE = "checkpoint", "tensors.safetensors", "state.json"
FORMAT = "deltatune.train-checkpoint/1"


def _flat_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{slot}"] = value
            else:
                scalars[f"{index}.{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    for key, value in meta["scalars"].items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(
    out: Path,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    epoch_generator_state: torch.Tensor,
    best_state: dict[str, torch.Tensor],
    loop: dict[str, Any],
) -> None:
    """Write the checkpoint folder (main process only); `loop` holds JSON-able counters and the curve."""
    from safetensors.torch import save_file

    opt_tensors, opt_meta = _flat_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in best_state.items()}
    tensors |= opt_tensors
    schedules = [name for name, delta in getattr(model, "deltas", {}).items() if delta.schedule_state()]
    for i, name in enumerate(schedules):  # by position: delta names may hold dots
        tensors |= {f"schedule.{i}.{k}": v for k, v in model.deltas[name].schedule_state().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = epoch_generator_state
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"format": FORMAT, "optimizer": opt_meta, "scheduler": _jsonable(scheduler.state_dict()), "loop": loop}
    meta["schedules"] = schedules
    with replacing_folder(out / FOLDER) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(meta))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.tolist()
    return value if isinstance(value, int | float | str | bool | type(None)) else None


class ResumeRefused(ValueError):
    """A checkpoint this run cannot continue (other settings, data, model or format): the run must start afresh."""


def load(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors and JSON state; a clear error when there is none to resume."""
    from safetensors.torch import load_file

    folder = Path(out) / FOLDER
    if not (folder / STATE).exists():
        raise FileNotFoundError(f"{folder} holds no checkpoint to resume; drop --resume to start the run afresh")
    meta = json.loads((folder / STATE).read_text())
    if meta.get("format") != FORMAT:
        raise ResumeRefused(f"{folder / STATE} is not a deltatune training checkpoint ({FORMAT!r} expected)")
    return load_file(str(folder / TENSORS)), meta


def restore(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module, optimizer: Any, scheduler: Any
) -> dict[str, torch.Tensor]:
    """Put the model, optimizer, schedule and torch RNG back; returns the best tensors so far."""
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise ResumeRefused(
            "the checkpoint was written for another configuration (other methods or model): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}; resume with the settings it was started with"
        )
    optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    for i, name in enumerate(meta.get("schedules", [])):
        prefix = f"schedule.{i}."
        model.deltas[name].load_schedule_state(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}


PROVENANCE = {
    "backbone_sha": "another backbone (--model)",
    "data_sha": "other training or dev rows (--task, or its files changed)",
}
QUANTIZED = "quantize"  # "4bit"/"8bit" where the backbone is quantized: named, not "another backbone"


def provenance(backbone: torch.nn.Module, train: list[Any], dev: list[Any]) -> dict[str, str]:
    """What a resumed run must share with the run that wrote the checkpoint beyond its settings: the backbone
    (its identity: structure and signatures) and the data (a hash of every training and dev row). `--resume`
    with another `--model` of the same shapes, or another file of the same name and size, continued without a
    word: the saved delta then reported the checkpoint's best dev score and scored 0.45 (or 0.0) on eval."""
    import hashlib

    from ..core.identity import fingerprint
    from ..core.layers import bnb_bits

    fp = fingerprint(backbone)
    model = hashlib.sha256(json.dumps([fp["structure_sha256"], fp["signatures"]]).encode()).hexdigest()[:16]
    rows = hashlib.sha256(repr([list(train), list(dev)]).encode()).hexdigest()[:16]
    bits = {bnb_bits(p) for p in backbone.parameters()} - {None}
    return {"backbone_sha": model, "data_sha": rows} | ({QUANTIZED: f"{max(bits)}bit"} if bits else {})


def check_same_settings(saved: dict[str, Any] | None, now: dict[str, Any], out: Path) -> None:
    """A checkpoint restores the step budget, schedule and data order it was written with: other flags
    would be ignored (a larger --max-steps) or mixed in (another --lr, batch size or data) without a word."""
    if saved is None:  # written before checkpoints recorded their settings
        return
    now = {k: v for k, v in now.items() if k in saved or k not in ("backbone_sha", "data_sha")}  # older checkpoints
    flat_saved = {**saved.get("train", {}), **{k: v for k, v in saved.items() if k != "train"}}
    flat_now = {**now["train"], **{k: v for k, v in now.items() if k != "train"}}
    differ = [k for k in sorted(set(flat_saved) | set(flat_now)) if flat_saved.get(k) != flat_now.get(k)]
    if QUANTIZED in differ:  # the same backbone loaded otherwise: its structure differs too, but that says less
        differ = [k for k in differ if k != "backbone_sha"]
    if differ:
        shown = ", ".join(
            PROVENANCE.get(k) or f"{k} {flat_saved.get(k)!r} (now {flat_now.get(k)!r})" for k in differ[:4]
        )
        raise ResumeRefused(
            f"the checkpoint in {out} was written by a run with other settings: {shown}; resume with the "
            "settings it was started with, or drop --resume to start afresh"
        )
