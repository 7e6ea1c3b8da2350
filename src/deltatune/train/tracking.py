"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, ...) for a run, through accelerate's trackers.

`TrainConfig(report_to="tensorboard")` (`deltatune train --report-to tensorboard`, `train: {report_to: ...}` in a
study spec) logs every dev evaluation (train loss, learning rate, epoch, every dev metric), the run's settings,
and at the end its best dev and test scores, as `transformers.Trainer(report_to=...)` does. accelerate owns the
trackers; what is ours is the checking: accelerate drops a tracker whose package is missing with a debug line
only, so `report_to="wandb"` without wandb would train without logging a thing. Here it is refused before
training, naming the package to install.

Where the logs go: TensorBoard (and other trackers that write files) under `<output_dir>/logs/deltatune/`, so
`tensorboard --logdir runs/` shows every run by its folder; W&B, MLflow and Trackio log to project (experiment)
"deltatune" with the output folder's name as the run's name.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

PROJECT = "deltatune"
# how each tracker's __init__ (through accelerate) takes the run's name
NAME_KWARG = {"wandb": "name", "mlflow": "run_name", "trackio": "name", "comet_ml": "experiment_name"}
PACKAGE = {"tensorboard": "tensorboard (or tensorboardX)", "comet_ml": "comet-ml"}


def known() -> list[str]:
    """The tracker names accelerate knows (`all`: every one installed)."""
    from accelerate.utils import LoggerType

    return [str(t.value) for t in LoggerType]


def parse(report_to: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The trackers a `report_to` names ("tensorboard", "wandb,mlflow", "all", "none"), each installed.

    Refused: a name accelerate does not know (with the close names) and a tracker whose package is missing,
    which accelerate would drop without a word."""
    if report_to is None:
        return []
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if names in ([], ["none"]):
        return []
    from accelerate.tracking import get_available_trackers

    every = known()
    available = [str(t.value) for t in get_available_trackers()]
    for name in names:
        if name not in every or name == "none":
            close = difflib.get_close_matches(name, every, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"unknown tracker {name!r} in report_to; {hint}known: {', '.join(every)}, none")
        if name != "all" and name not in available:
            raise ValueError(
                f"report_to {name!r} needs the {PACKAGE.get(name, name)} package, which is not installed: "
                f"pip install {PACKAGE.get(name, name).split(' ')[0]}"
            )
    if "all" in names:
        if not available:
            raise ValueError("report_to 'all' found no tracker installed (e.g. pip install tensorboard)")
        return available
    return list(dict.fromkeys(names))


def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as `a/b` keys with scalar values: what trackers' hyperparameter tables take."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, f"{name}/")
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start(accelerator: Any, trackers: list[str], run_name: str, settings: dict[str, Any]) -> None:
    """Open the run in every tracker (the main process alone logs; accelerate sees to that)."""
    if not trackers:
        return
    init = {t: {NAME_KWARG[t]: run_name} for t in trackers if t in NAME_KWARG}
    accelerator.init_trackers(PROJECT, config=flat(settings), init_kwargs=init)


def evaluation(row: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl row as tracker scalars: train/loss, train/lr, train/epoch, dev/<metric>."""
    train = {"train_loss": "train/loss", "lr": "train/lr", "epoch": "train/epoch"}
    out = {}
    for key, value in row.items():
        if key in ("step", "elapsed") or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        out[train.get(key, f"dev/{key}")] = float(value)
    return out


def summary(best: dict[str, float], best_step: int, test: dict[str, float] | None) -> dict[str, float]:
    """The run's end: its best dev scores (and the step), and the kept delta's test scores."""
    out = {f"best/dev_{k}": float(v) for k, v in best.items() if isinstance(v, int | float)}
    out["best/step"] = float(best_step)
    out |= {f"test/{k}": float(v) for k, v in (test or {}).items() if isinstance(v, int | float)}
    return out


def logging_dir(output_dir: str | Path | None, trackers: list[str]) -> str | None:
    """`<output_dir>/logs` for trackers that write files; refused without an output_dir (where would they go)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    needs = [t for t in trackers if getattr(LOGGER_TYPE_TO_CLASS.get(t), "requires_logging_directory", False)]
    if needs and output_dir is None:
        raise ValueError(f"report_to {needs[0]!r} writes its logs beside the run: give fit() an output_dir")
    return str(Path(output_dir) / "logs") if output_dir is not None and trackers else None
