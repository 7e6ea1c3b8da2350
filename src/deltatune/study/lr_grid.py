"""A fair learning rate per method: a small grid of rates per method, run on dev, before the study.

The paper tuned each method's learning rate; a study at one rate per method measures the rate as
much as the method. The spec's `lr_grid:` names a few rates per method and the tasks (one seed) to
try them on. Its runs come first in the plan (filed under a group per model and method); a method's
main runs wait until its group has nothing pending or running, then train at the rate with the best
mean dev score over the grid tasks, filed once in the store (`meta.lr_choice`) so later runs cannot
drift. The grid's run at the chosen rate on a grid task is the same run as the main one there, so it
is recorded as that run instead of training twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLE = "write `lr_grid: {tasks: [sst2, mrpc], rates: {lora: [3.0e-4, 1.0e-3, 3.0e-3]}}`"
# job fields that differ between a grid run and the main run it stands for
SAME_RUN_IGNORES = {"key", "id", "lr_group", "lr_from", "lr_choice", "output_dir"}


@dataclasses.dataclass
class LRGrid:
    """Each rate of `rates[label]` on `tasks` with `seed`; for the head-only column the rate is the head's."""

    tasks: list[str]
    rates: dict[str, list[float]]
    seed: int = 42


def rate_field(label: str) -> str:
    """The TrainConfig field a column's rate sets: head-only trains nothing but its head (`head_lr`)."""
    return "head_lr" if label.split("@")[0] == "head" else "lr"


def lr_group(model: str, label: str) -> str:
    """The name under which a method's grid runs and its chosen rate are filed (one per model)."""
    return f"{Path(model).name}/{label}"


def grid_key(key: str, lr: float) -> str:
    return f"{key}/lr{lr:g}"


def study_task(name: str, tasks: list[str]) -> str:
    """The study's task `name` means: as written in `tasks`, or by its folder's name (`sst2` for `/data/sst2`, as
    `task_train` takes it); `name` itself when none or several match (the caller refuses it)."""
    if name in tasks:
        return name
    named = [t for t in tasks if Path(t).name == name]
    return named[0] if len(named) == 1 else name


def parse(
    raw: Any, labels: set[str], tasks: list[str], seeds: list[int], fail: Callable[[str, str, str], Exception]
) -> LRGrid | None:
    """The spec's `lr_grid:` checked against the study's methods and tasks (`fail` builds the spec error)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"tasks", "rates", "seed"} or not raw.get("rates"):
        raise fail("lr_grid", f"got {raw!r}", EXAMPLE)
    grid_tasks = [study_task(str(t), tasks) for t in (raw.get("tasks") or tasks[:1])]
    stray = [t for t in grid_tasks if t not in tasks]
    if stray:
        raise fail("lr_grid.tasks", f"{stray} are not tasks of this study", f"use some of {tasks}")
    rates: dict[str, list[float]] = {}
    for label, values in dict(raw["rates"]).items():
        if label not in labels:
            raise fail(f"lr_grid.rates.{label}", "not a method of this study", f"use some of {sorted(labels)}")
        values = values if isinstance(values, list) else [values]
        if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values):
            raise fail(f"lr_grid.rates.{label}", f"{values!r} are not positive numbers", EXAMPLE)
        rates[label] = [float(v) for v in values]
    seed = raw.get("seed", seeds[0])
    if not isinstance(seed, int):
        raise fail("lr_grid.seed", f"{seed!r} is not an integer", "write e.g. `seed: 42`")
    return LRGrid(grid_tasks, rates, seed)


def choose(runs: list[tuple[float, str, float | None]]) -> dict[str, Any] | None:
    """The best rate from a group's (rate, status, dev score) rows; None when no rate finished everywhere.

    A rate counts only where every task it ran on finished (a rate that failed on one task is not
    judged on the other alone); ties go to the smaller rate.
    """
    by_rate: dict[float, list[float | None]] = {}
    for rate, status, score in runs:
        by_rate.setdefault(rate, []).append(score if status == "done" else None)
    scores = {rate: sum(v) / len(v) for rate, v in by_rate.items() if v and all(x is not None for x in v)}
    if not scores:
        return None
    best = max(sorted(scores), key=lambda rate: scores[rate])
    return {"lr": best, "dev_scores": {f"{k:g}": v for k, v in sorted(scores.items())}, "runs": len(runs)}


def same_run(grid_job: dict[str, Any], job: dict[str, Any]) -> bool:
    """Whether a grid run and a main run (its rate resolved) are one run: same task, seed and settings."""
    return {k: v for k, v in grid_job.items() if k not in SAME_RUN_IGNORES} == {
        k: v for k, v in job.items() if k not in SAME_RUN_IGNORES
    }
