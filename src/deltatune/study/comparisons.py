"""The analyses that compare deltas with each other: combinations of methods, transfer between tasks, and
scaling across backbones. Same conventions as `analyses` (test scores x100, seed means), whose loaded
`StudyData` they read.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from . import verdicts
from .analyses import (
    DEV_NOTE,
    StudyData,
    Table,
    cell_runs,
    complete_tasks,
    dev_mark,
    fmt,
    grid,
    mean_std,
    method_averages,
    score,
    seeds_left,
)
from .grid import combination_labels

# Data about the paper (Ding et al. 2023): its combination table (RoBERTa-large, GLUE average) and the
# letters it names the methods by, under the names this library registers them with.
PAPER_COMBINATION = {
    "none": 23.7,
    "A": 87.4,
    "B": 86.6,
    "B+A": 87.1,
    "P": 77.7,
    "P+A": 86.6,
    "P+B": 86.5,
    "P+B+A": 87.0,
}
LETTERS = {"prompt": "P", "bitfit": "B", "adapter": "A"}


def combination(data: StudyData) -> list[Table]:
    chosen = data.spec.get("combination") or []
    if not chosen:
        return []
    tables = []
    for model in data.models():
        cells, runs = grid(data, model), cell_runs(data, model)
        labels = combination_labels(chosen)
        tasks = [t for t in data.tasks() if any((t, lbl) in cells for lbl in labels)]
        complete = [t for t in tasks if all((t, lbl) in cells for lbl in labels)]
        rows = []
        for lbl in labels:
            short = "none" if lbl == "head" else "+".join(LETTERS.get(m, m) for m in lbl.split("+"))
            row = [short] + [
                fmt(mean_std(cells[(t, lbl)])[0])
                + verdicts.cell_marks(runs[(t, lbl)], data.curves)  # a row at the majority class said nothing
                + dev_mark(runs[(t, lbl)])
                + seeds_left(len(runs[(t, lbl)]), data.todo.get((model, t, lbl), 0))
                if (t, lbl) in cells
                else "-"
                for t in tasks
            ]
            scores = [mean_std(cells[(t, lbl)])[0] for t in complete]
            row.append(fmt(statistics.fmean(scores)) if scores else "-")
            rows.append(row + [fmt(PAPER_COMBINATION.get(short, math.nan))])
        note = (
            "Rows in the paper's order (P prompt, B BitFit, A adapter; none = frozen backbone + trained head). "
            f"Average over the {len(complete)} tasks every subset finished. Paper column: RoBERTa-large, GLUE "
            f"average, full data. {verdicts.MARKS_NOTE}"
        ) + (
            f" {DEV_NOTE}" if any(dev_mark(runs[(t, lbl)]) for t in tasks for lbl in labels if (t, lbl) in runs) else ""
        )
        tables.append(Table(f"Combination: {model}", ["delta"] + tasks + ["average", "paper"], rows, note))
    return tables


def transfer_matrix(data: StudyData, model: str, method: str) -> tuple[list[str], dict[tuple[str, str], float]]:
    """(source, target) -> transferred score minus the from-scratch score on target (x100), paired by seed: the mean
    over the seeds where both runs finished of (transferred - from scratch). Means over each side's own seeds put a
    transfer of seed 1 against the scratch runs of seeds 1 and 2 while seed 2's transfer was still to run (-22.9
    where the one pair present said 0.0), and a target's `more_seeds` runs (no transferred twin) moved an unchanged
    pair's gain from 0.0 to -7.3."""
    scratch: dict[tuple[str, int], float] = {}
    for r in data.base:
        if r["model"] == model and r["method"] == method:
            scratch[(r["task"], r["seed"])] = score(r)
    pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in data.runs:
        if r["source_task"] and r["model"] == model and r["method"] == method and (r["task"], r["seed"]) in scratch:
            pairs[(r["source_task"], r["task"])].append(score(r) - scratch[(r["task"], r["seed"])])
    tasks = [t for t in data.tasks() if any(k[0] == t for k in scratch)]
    return tasks, {k: statistics.fmean(v) for k, v in pairs.items()}


def transfer_seeds(data: StudyData, model: str, method: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(source, target) -> (seeds with both runs done, seeds the study plans): a cell of fewer pairs says so."""
    planned = len(data.spec.get("seeds") or []) or 1
    done: dict[tuple[str, str], set[int]] = defaultdict(set)
    scratch = {(r["task"], r["seed"]) for r in data.base if r["model"] == model and r["method"] == method}
    for r in data.runs:
        if r["source_task"] and r["model"] == model and r["method"] == method and (r["task"], r["seed"]) in scratch:
            done[(r["source_task"], r["task"])].add(r["seed"])
    return {k: (len(v), planned) for k, v in done.items()}


def transfer(data: StudyData) -> list[Table]:
    tables = []
    for model in data.models():
        for method in sorted({r["method"] for r in data.runs if r["source_task"] and r["model"] == model}):
            tasks, gains = transfer_matrix(data, model, method)
            paired = transfer_seeds(data, model, method)
            on_dev = {t for t in tasks if dev_mark(cell_runs(data, model)[(t, method)])}  # no test split: dev both ways

            def cell(s: str, t: str, gains: dict = gains, paired: dict = paired, on_dev: set = on_dev) -> str:
                if (s, t) not in gains:
                    return ""
                k, n = paired[(s, t)]
                return (
                    fmt(gains[(s, t)]) + (" (dev)" if t in on_dev else "") + (f" ({k} of {n} seeds)" if k < n else "")
                )

            rows = [[s] + [cell(s, t) for t in tasks] for s in tasks]
            note = "Rows: the task the delta was trained on; columns: the task it continued on. Gain over training from scratch (points x100)."
            if on_dev:
                note += (
                    " (dev): the target task has no test score; the gain is measured on its dev split, both runs alike."
                )
            tables.append(Table(f"Transfer ({method}): {model}", ["from \\ to"] + tasks, rows, note))
    return tables


def scaling(data: StudyData) -> list[Table]:
    models = data.models()
    if len(models) < 2:
        return []
    sizes = {m: next(r["total"] for r in data.base if r["model"] == m) for m in models}
    # the same tasks for every model: MiniLM's 12 against MPNet's 4 compared two different averages
    shared = set.intersection(*(set(complete_tasks(data, m)) for m in models))
    tasks = [t for t in data.tasks() if t in shared]
    avgs = {m: method_averages(data, m, tasks) for m in models}
    rows = [[f"{m} ({sizes[m] / 1e6:.1f}M)"] + [fmt(avgs[m].get(x, math.nan)) for x in data.methods()] for m in models]
    note = (
        f"Average test score over the {len(tasks)} tasks every model finished with every method "
        f"({', '.join(tasks) or 'none yet'}). Paper: the gap to full FT shrinks with size."
    )
    if any(r["test_score"] is None for r in data.base):
        note += " A task without a test score counts its dev score (marked (dev) in the Performance tables)."
    return [Table("Scaling", ["model"] + data.methods(), rows, note)]
