"""What a score can be trusted for: did the run finish learning, did it beat the majority class,
and at which learning rate was it trained.

A study at a short budget cannot tell a method's weakness from an unfinished run; these are the
marks the report puts next to each cell so that no cell is left unexplained:
- `still_improving`: the run stopped at a bound (steps or epochs) while dev was still rising;
- `at_majority`: the best dev score never beat always predicting the most frequent dev label.
Both read the store only (the majority score of stores written before it was recorded is
recomputed from the task's dev file, with the same capped sample the run evaluated on).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from functools import cache
from typing import Any

from .lr_grid import rate_field

BOUND_STOPS = (None, "max_steps", "max_epochs")  # None: a run recorded before stop reasons were
LATE = 2  # without a patience setting: the best score came at one of the last LATE evaluations
MARK_IMPROVING, MARK_MAJORITY = "↑", "†"
MARKS_NOTE = (
    f"{MARK_IMPROVING}: a run was stopped by its step/epoch bound before its patience saw a plateau (fewer "
    f"evaluations after its best than its patience; without patience: best at one of its last {LATE}): the "
    f"score may understate the method. {MARK_MAJORITY}: no seed's best dev score beat always predicting the "
    "most frequent dev label (the run learned nothing usable)."
)


def still_improving(run: dict[str, Any], curve: list[dict[str, Any]]) -> bool:
    """Stopped by a bound (not by patience, not diverged) before patience would have called a plateau.

    The evaluations after the best are counted against the run's own patience, so a run marked here
    is one the budget rule itself did not consider finished.
    """
    if run.get("stop_reason") not in BOUND_STOPS or not curve:
        return False
    from ..train.trainer import TrainConfig

    train = (run.get("job") or {}).get("train") or {}
    # a spec that leaves patience at its default trained with TrainConfig's (it read LATE, 2, where 5 applied)
    patience = train["patience"] if "patience" in train else TrainConfig().patience
    patience = patience or LATE
    after = sum(1 for p in curve if p["step"] > (run.get("best_step") or 0))
    return after < patience


@cache
def _dev_majority(task: str, metric: str, cap: int | None) -> float | None:
    try:
        from ..data.metrics import compute_metrics
        from ..data.tasks import load_task
        from ..train.evaluation import eval_sample

        t = load_task(task, splits=("dev",))
    except (FileNotFoundError, KeyError, ValueError, ImportError):
        return None
    if t.type not in ("classification", "pair_classification"):
        return None
    dev = eval_sample(list(t["dev"]), cap)
    label = Counter(e.label for e in dev).most_common(1)[0][0]
    return compute_metrics(t, [label] * len(dev), dev).get(metric)


def majority(run: dict[str, Any]) -> float | None:
    """The dev score of the majority-class predictor for this run's task (recorded, else recomputed)."""
    if run.get("majority") is not None:
        return run["majority"]
    job = run.get("job") or {}
    if not job.get("task") or not run.get("metric"):
        return None
    return _dev_majority(job["task"], run["metric"], (job.get("train") or {}).get("max_eval"))


def at_majority(run: dict[str, Any]) -> bool:
    base = majority(run)
    return base is not None and run.get("dev_score") is not None and run["dev_score"] <= base + 1e-9


def cell_marks(runs: list[dict[str, Any]], curves: dict[int, list[dict[str, Any]]]) -> str:
    """The marks of one table cell (one task and method over seeds)."""
    marks = ""
    if any(still_improving(r, curves.get(r["id"], [])) for r in runs):
        marks += MARK_IMPROVING
    if runs and all(at_majority(r) for r in runs):
        marks += MARK_MAJORITY
    return marks


def method_rates(runs: list[dict[str, Any]]) -> dict[str, str]:
    """method -> the learning rate its runs trained at ("1e-3", or "1e-3/3e-3" when they differ)."""
    rates: dict[str, set[float]] = defaultdict(set)
    for r in runs:
        if r.get("lr") is not None:
            rates[r["method"]].add(r["lr"])
    return {m: "/".join(f"{v:g}" for v in sorted(vals)) for m, vals in rates.items()}


def stop_counts(runs: list[dict[str, Any]]) -> dict[str, Counter]:
    """method -> how many of its runs stopped for each reason."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r in runs:
        out[r["method"]][r.get("stop_reason") or "unrecorded"] += 1
    return out


def grid_rows(tuning: list[dict[str, Any]], chosen: dict[str, Any]) -> list[list[str]]:
    """One row per method of the learning-rate grid: each rate's mean dev score x100, the chosen one in bold."""
    by: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in tuning:
        job = r.get("job") or {}
        rate = (job.get("train") or {}).get(rate_field(r["method"]))
        if rate is not None and r.get("dev_score") is not None:
            by[(r["model"], r["method"])][rate].append(100 * r["dev_score"])
    rows = []
    for (model, method), rates in by.items():
        pick = (chosen.get(f"{model}/{method}") or {}).get("lr")
        cells = []
        for rate, scores in sorted(rates.items()):
            text = f"{rate:g}: {sum(scores) / len(scores):.1f}" + ("" if len(scores) > 1 else " (1 task)")
            cells.append(f"**{text}**" if pick is not None and math.isclose(rate, pick) else text)
        rows.append([f"{method} ({model})", "; ".join(cells), f"{pick:g}" if pick is not None else "not chosen yet"])
    return rows
