"""The paper's analyses computed from a study file: plain tables (and the series the plots draw).

Scores are test scores of the delta chosen on dev (dev scores where a task has no test split), x100,
averaged over seeds. Everything here reads the store; nothing trains.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from . import verdicts
from .grid import combination_labels
from .store import Store

# Data about the paper (Ding et al. 2023, T5-base), not special cases: the methods it ranks, by the names
# this library registers them under.
PAPER_RANKING = ["full", "lora", "adapter", "prefix", "prompt"]
PAPER_CONVERGENCE = "full fine-tuning fastest; adapter ~ LoRA; prefix slower; prompt tuning slowest"


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclasses.dataclass
class StudyData:
    name: str
    spec: dict[str, Any]
    runs: list[dict[str, Any]]  # finished runs
    curves: dict[int, list[dict[str, Any]]]
    counts: dict[str, int]
    lr_choice: dict[str, Any] = dataclasses.field(default_factory=dict)  # grid group -> the chosen rate
    todo: dict[tuple[str, str, str], int] = dataclasses.field(default_factory=dict)  # (model, task, method): runs left

    @property
    def base(self) -> list[dict[str, Any]]:
        """The study's runs proper: not transferred, not a learning-rate grid run."""
        return [r for r in self.runs if not r["source_task"] and not _is_grid(r)]

    @property
    def tuning(self) -> list[dict[str, Any]]:
        """The learning-rate grid's runs (their rate is in the job's train settings)."""
        return [r for r in self.runs if _is_grid(r)]

    def methods(self) -> list[str]:
        order = [m["label"] for m in self.spec.get("methods", [])]
        order += combination_labels(self.spec.get("combination") or []) if self.spec.get("combination") else []
        seen = {r["method"] for r in self.runs}
        return [m for m in dict.fromkeys(order) if m in seen] + sorted(seen - set(order))

    def tasks(self) -> list[str]:
        order = [Path(t).name for t in self.spec.get("tasks", [])]
        seen = {r["task"] for r in self.runs}
        return [t for t in dict.fromkeys(order) if t in seen] + sorted(seen - set(order))

    def models(self) -> list[str]:
        order = [Path(m).name for m in self.spec.get("models", [])]
        seen = {r["model"] for r in self.runs}
        return [m for m in dict.fromkeys(order) if m in seen] + sorted(seen - set(order))


def _is_grid(run: dict[str, Any]) -> bool:
    return bool((run.get("job") or {}).get("lr_group"))


def budget_of(spec: dict[str, Any]) -> dict[str, Any]:
    """What a study's runs were trained under: the data caps and the train settings (per task too)."""
    budget = {k: spec.get(k) for k in ("k_shot", "max_train", "quantize") if spec.get(k)}
    return budget | (spec.get("train") or {}) | ({"task_train": spec["task_train"]} if spec.get("task_train") else {})


def load(db: str | Path, also: tuple[str | Path, ...] = ()) -> StudyData:
    """A study file's runs; with `also`, other study files' runs joined in (another backbone's half
    of a study, for the scaling table). The first file's spec names the study and orders the columns."""
    if not Path(db).exists():
        raise FileNotFoundError(f"no study file {db}; run `deltatune study run <spec> --db {db}` first")
    store = Store(db, readonly=True)
    try:
        planned = set(store.meta("planned") or ())  # runs the spec no longer lists are left out (stores before: all)
        runs = [r for r in store.runs() if not planned or r["key"] in planned]
        counts = {s: sum(r["status"] == s for r in runs) for s in store.counts()}
        todo = Counter(
            (r["model"], r["task"], r["method"])
            for r in runs
            if r["status"] != "done" and not r["source_task"] and not _is_grid(r)
        )
        data = StudyData(
            store.meta("name", Path(db).stem),
            store.meta("spec", {}),
            [r for r in runs if r["status"] == "done"],
            store.curves(),
            counts,
            store.meta("lr_choice", {}),
            dict(todo),
        )
    finally:
        store.close()
    seen = {Path(db).resolve()}
    own = ", ".join(Path(m).name for m in data.spec.get("models", []))
    budgets = {own: budget_of(data.spec)}
    for k, other in enumerate(also, start=1):
        if Path(other).resolve() in seen:
            raise ValueError(f"--with {other}: that study file is joined already; name each file once")
        seen.add(Path(other).resolve())
        more = load(other)
        shared = sorted({r["model"] for r in data.runs} & {r["model"] for r in more.runs})
        if shared:  # its runs would join the same cells as more seeds, whatever their budget and rates
            raise ValueError(
                f"--with {other} holds runs of {', '.join(shared)}, which the study joined before it has too: --with "
                "joins another backbone's half of a study (the scaling table); report each study of one model on its own"
            )
        offset = k * 10**9  # run ids restart at 1 in every file
        data.runs += [r | {"id": r["id"] + offset} for r in more.runs]
        data.curves |= {i + offset: c for i, c in more.curves.items()}
        data.counts = {s: data.counts.get(s, 0) + more.counts.get(s, 0) for s in data.counts | more.counts}
        data.lr_choice |= more.lr_choice
        data.todo |= more.todo
        spec = dict(data.spec)
        budgets[", ".join(Path(m).name for m in more.spec.get("models", []))] = budget_of(more.spec)
        if any(b != budgets[own] for b in budgets.values()):  # the header showed the first study's budget alone
            spec["budgets"] = dict(budgets)
        spec["models"] = list(dict.fromkeys(list(spec.get("models", [])) + list(more.spec.get("models", []))))
        spec["analyses"] = list(dict.fromkeys(list(spec.get("analyses") or []) + ["scaling"]))
        data.spec = spec
    return data


def score(run: dict[str, Any]) -> float:
    value = run["test_score"] if run["test_score"] is not None else run["dev_score"]
    return 100.0 * value if value is not None else math.nan


DEV_NOTE = (
    "(dev): a run of this cell has no test score (its task has no test split, or eval_test is off): the "
    "number is the dev score the delta was chosen on, not a test score."
)


def dev_mark(runs: list[dict[str, Any]]) -> str:
    """The mark of a cell scored on dev: without it a dev score would read as a test score."""
    return " (dev)" if any(r["test_score"] is None for r in runs) else ""


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and std over seeds; std None for one seed (two seeds that agree show "± 0.0", not a lone score)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(mean: float, std: float | None = None, digits: int = 1) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def cell_runs(data: StudyData, model: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in data.base:
        if r["model"] == model:
            cells[(r["task"], r["method"])].append(r)
    return cells


def grid(data: StudyData, model: str) -> dict[tuple[str, str], list[float]]:
    """(task, method) -> scores over seeds, for the base (not transferred) runs of one model."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in data.base:
        if r["model"] == model:
            cells[(r["task"], r["method"])].append(score(r))
    return cells


def complete_tasks(data: StudyData, model: str) -> list[str]:
    """The tasks on which every method of the study finished for `model`."""
    cells, methods = grid(data, model), data.methods()
    return [t for t in data.tasks() if all((t, m) in cells for m in methods)]


def method_averages(data: StudyData, model: str, tasks: list[str] | None = None) -> dict[str, float]:
    """Each method's average over the tasks every method finished (so averages compare like with like), or over
    `tasks` (the scaling table: the tasks every model finished)."""
    cells, methods = grid(data, model), data.methods()
    tasks = complete_tasks(data, model) if tasks is None else tasks
    return {m: statistics.fmean(mean_std(cells[(t, m)])[0] for t in tasks) if tasks else math.nan for m in methods}


def performance(data: StudyData) -> list[Table]:
    tables = []
    for model in data.models():
        cells, methods, runs = grid(data, model), data.methods(), cell_runs(data, model)
        tasks = [t for t in data.tasks() if any((t, m) in cells for m in methods)]
        rows = []
        for t in tasks:
            metric = next(r["metric"] for r in data.base if r["task"] == t)
            rows.append(
                [f"{t} ({metric})"]
                + [
                    fmt(*mean_std(cells[(t, m)]))
                    + verdicts.cell_marks(runs[(t, m)], data.curves)
                    + dev_mark(runs[(t, m)])
                    + seeds_left(len(runs[(t, m)]), data.todo.get((model, t, m), 0))
                    if (t, m) in cells
                    else "-"
                    for m in methods
                ]
            )
        avg = method_averages(data, model)
        complete = [t for t in tasks if all((t, m) in cells for m in methods)]
        partial = sum(1 for t in complete for m in methods if data.todo.get((model, t, m)))
        waiting = f"; {partial} cells with seeds still to run" if partial else ""
        rows.append([f"**average** ({len(complete)} tasks{waiting})"] + [fmt(avg[m]) for m in methods])
        full = next((m for m in methods if m.split("@")[0] == "full"), None)  # full@lr1e-4 is full FT too
        if full is not None and not math.isnan(avg[full]):
            # a ratio to an average near or below zero (MCC, Pearson) is noise or flips its sign
            rows.append([f"% of {full} FT" if full != "full" else "% of full FT"] + [
                fmt(100 * avg[m] / avg[full]) if avg[full] >= 1.0 else "-" for m in methods
            ])  # fmt: skip
        mine = [r for r in data.base if r["model"] == model]
        rates = verdicts.method_rates(mine)
        if rates:
            rows.append(["learning rate"] + [rates.get(m, "-") for m in methods])
        stops = verdicts.stop_counts(mine)
        if any(set(c) - {"unrecorded"} for c in stops.values()):
            rows.append(["stopped by"] + [", ".join(f"{k} {v}" for k, v in sorted(stops[m].items())) for m in methods])
        seeds = sorted({r["seed"] for r in data.base if r["model"] == model})  # this model's, not a joined one's
        note = (
            f"Test score x100 of the delta chosen on dev (mean ± std over seeds {seeds}); the average uses "
            f"only tasks where every method finished. {verdicts.MARKS_NOTE} Learning rate: the delta's (the "
            "head's for head-only), chosen on dev where the study has a learning-rate grid."
        )
        if any(dev_mark(r) for r in runs.values()):
            note += f" {DEV_NOTE}"
        tables.append(Table(f"Performance: {model}", ["task"] + methods, rows, note))
    if data.tuning:
        note = (
            "Mean dev score x100 of each rate over the grid's tasks (one seed); bold: the rate the study's runs "
            "use (the best mean over the tasks where every rate finished; ties to the smaller rate)."
        )
        rows = verdicts.grid_rows(data.tuning, data.lr_choice)
        tables.append(Table("Learning rate per method (dev grid)", ["method", "rates: dev", "chosen"], rows, note))
    return tables


def seeds_left(done: int, todo: int) -> str:
    """A cell some of whose seeds are still to run: its mean is of the finished ones only."""
    return f" ({done} of {done + todo} seeds)" if todo else ""


def ranking(data: StudyData, model: str) -> list[str]:
    avg = method_averages(data, model)
    return sorted((m for m in avg if not math.isnan(avg[m])), key=lambda m: -avg[m])


def mean_curves(data: StudyData, model: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(task, method) -> [(step, dev score x100)], averaged over seeds at the steps they share.

    Seeds stopped by patience at other steps: a step only some of them reached was averaged over those alone, so
    the curve's tail was one seed's (steps to 90% read 32 where the shared steps said flat)."""
    by: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs = run_curves(data, model)
    for k, curves in runs.items():
        for curve in curves:
            for step, value in curve:
                by[k][step].append(value)
    n = {k: len(curves) for k, curves in runs.items()}
    return {
        k: [(s, statistics.fmean(v)) for s, v in sorted(steps.items()) if len(v) == n[k]] for k, steps in by.items()
    }


def run_curves(data: StudyData, model: str) -> dict[tuple[str, str], list[list[tuple[int, float]]]]:
    """(task, method) -> each run's [(step, dev score x100)] (one per seed)."""
    out: dict[tuple[str, str], list[list[tuple[int, float]]]] = defaultdict(list)
    for r in data.base:
        if r["model"] != model:
            continue
        curve = [
            (p["step"], 100 * p[r["metric"]]) for p in data.curves.get(r["id"], []) if p.get(r["metric"]) is not None
        ]
        if curve:
            out[(r["task"], r["method"])].append(curve)
    return out


def seeds_steps_to_90(curves: list[list[tuple[int, float]]]) -> str:
    """A cell's steps to 90%: each seed's own, averaged over the seeds that learned (k of n said when not all)."""
    vals = [v for c in curves if (v := steps_to_90(c)) is not None]
    if not vals:
        return "flat"
    return f"{statistics.fmean(vals):.0f}" + (
        f" ({len(vals)} of {len(curves)} seeds)" if len(vals) < len(curves) else ""
    )


def steps_to_90(curve: list[tuple[int, float]], min_gain: float = 2.0) -> int | None:
    """First evaluated step that covers 90% of the run's best gain over its first evaluation.

    Measured from the first evaluation, not from zero: on accuracy a constant predictor already sits
    at 90% of a 55% final score, which would rank a method that learned nothing fastest. The best,
    not the last, score: a run stopped by patience ends several evaluations past its best. None when
    the best score is less than `min_gain` points above the first (nothing learned in the budget).
    """
    if not curve:
        return None
    start, best = curve[0][1], max(v for _, v in curve)
    if best - start < min_gain:
        return None
    return next(s for s, v in curve if v >= start + 0.9 * (best - start))


def convergence(data: StudyData) -> list[Table]:
    tables = []
    for model in data.models():
        curves, methods = run_curves(data, model), data.methods()
        tasks = [t for t in data.tasks() if any((t, m) in curves for m in methods)]
        rows = []
        for t in tasks:
            rows.append([t] + [seeds_steps_to_90(curves[(t, m)]) if (t, m) in curves else "-" for m in methods])
        means = []
        for m in methods:
            cells = [
                [v for c in curves[(t, m)] if (v := steps_to_90(c)) is not None] for t in tasks if (t, m) in curves
            ]
            vals = [statistics.fmean(c) for c in cells if c]
            means.append(f"{fmt(statistics.fmean(vals))} ({len(vals)} tasks)" if vals else "-")
        rows.append(["**mean** (tasks that learned)"] + means)
        note = (
            "Optimizer steps until the dev score covers 90% of its best gain over the first evaluation, each seed's "
            "own, averaged over seeds; flat: best score < 2 points above the first (nothing learned in this budget). "
            f"Paper: {PAPER_CONVERGENCE}."
        )
        tables.append(Table(f"Convergence: {model}", ["task"] + methods, rows, note))
    return tables


def efficiency(data: StudyData) -> list[Table]:
    tables = []
    for model in data.models():
        runs = [r for r in data.base if r["model"] == model]
        by: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            by[r["method"]].append(r)

        def med(m: str, key: str, by: dict[str, list[dict[str, Any]]] = by) -> float:
            vals = [r[key] for r in by.get(m, []) if r[key] is not None]
            return statistics.median(vals) if vals else math.nan

        ref = {k: med("full", k) for k in ("step_seconds", "peak_memory", "checkpoint_bytes")}
        total = med(next(iter(by)), "total") if by else math.nan
        kinds = {r["memory_kind"] for r in runs}
        rows = []
        for m in data.methods():
            if m not in by:
                continue
            params = med(m, "trainable")
            cells = [f"{params:,.0f}", f"{100 * params / total:.3f}%"]
            for key, scale, digits in (
                ("step_seconds", 1.0, 3),
                ("peak_memory", 2**-20, 0),
                ("checkpoint_bytes", 2**-20, 2),
            ):
                v = med(m, key)
                ratio = f" ({v / ref[key]:.2f}x)" if ref[key] and not math.isnan(ref[key]) else ""
                cells.append(f"{v * scale:,.{digits}f}{ratio}")
            rows.append([m] + cells)
        devices = sorted({r["device"] for r in runs})
        note = (
            f"Medians over runs on {', '.join(devices)}; ratios to full fine-tuning. Step time includes the dev "
            f"evaluations. Memory: {', '.join(sorted(kinds))} (peak RSS of the process during the run on CPU; "
            "max allocated on GPU). Full fine-tuning's checkpoint is the whole model (counted, not written)."
        )
        columns = ["method", "trainable params", "% of model", "s / step", "peak memory (MiB)", "checkpoint (MiB)"]
        tables.append(Table(f"Efficiency: {model}", columns, rows, note))
    return tables
