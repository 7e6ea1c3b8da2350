"""The study's tables in the paper's form (% of each method's own solution), as Markdown and HTML.

Every number is read back from the store, so the report can be rebuilt at any point of a run
(rows that are not there yet show as "-") and always says how many tasks each cell averages.
A store with several solution seeds adds held-out rows (subspaces found without the solution they are
compared with) beside the in-sample ones; every ratio is taken against the study seed's solution.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from ..core import atomic
from .space import space_kind
from .store import Store, share

PAPER = {  # Yi et al., % of the original method's performance (T5-base, 1,105,920-number solutions)
    "single": {"adapter": 88.5, "lora": 80.9, "prefix": 85.3, "avg": 84.9},
    "transfer": {"avg": 82.6},
    "multi": {"avg": 88.7},
    "multi-transfer": {"avg": 84.7},
}
SAMPLE_NOTE = (
    "In-sample rows (no 'held-out' in the label): the single-task subspace was found from the very solution each "
    "score is compared with, so ~100% is expected by construction. Held-out rows: the task's subspace was found "
    "from its solutions of the other seeds only, and is compared with the held-out (study) seed's solution, or with "
    "the mean of every seed's solution."
)


def of_original(r: dict) -> float | None:
    """A result row's share of its method's own solution, recomputed (stores written before `share` existed
    hold plain quotients, inverted where the original was negative)."""
    return share(r["score"], r["original"])


def undefined_note(store: Store) -> str:
    """Says how many results the %-of-original tables leave out because their solution scored <= 0."""
    rows = [r for r in store.rows("subspace_results") if r["stage"] in ("optimize", "transfer")]
    left = [r for r in rows if of_original(r) is None]
    if not left:
        return ""
    tasks = ", ".join(sorted({r["task"] for r in left}))
    return (
        f"{len(left)} of {len(rows)} results are left out of the % tables: their method's own solution scored "
        f"<= 0 ({tasks}; a correlation of a short run), where a share of it is undefined. Their gain over "
        "the head is in the next table."
    )


def _cell(values: list[float]) -> str:
    return f"{100 * mean(values):.1f} ({len(values)})" if values else "-"


def reference_solutions(store: Store) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, method) -> its solution row at the study's seed, the one every ratio is taken against.

    With several solution seeds the store holds a row per seed; the study's seed is the one each task's
    head was trained at (one head per task), so no row of another seed can stand in for it unnoticed.
    """
    rows = store.rows("subspace_solutions")
    head_seed = {r["task"]: r["seed"] for r in rows if r["method"] == "head"}
    return {(r["task"], r["method"]): r for r in rows if r["seed"] == head_seed.get(r["task"], r["seed"])}


def seed_scores(store: Store) -> dict[tuple[str, str], list[float]]:
    """(task, method) -> the scores of its solutions of every seed."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in store.rows("subspace_solutions"):
        out[(r["task"], r["method"])].append(r["score"])
    return out


def main_table(store: Store, methods: list[str]) -> list[list[str]]:
    rows = store.rows("subspace_results")
    seeds = seed_scores(store)

    def of_mean(r: dict) -> float | None:  # the score against the mean of every seed's solution of its method
        return share(r["score"], mean(seeds[(r["task"], r["method"])]))

    def ratios(select, value=of_original) -> dict[str, list[float]]:  # noqa: ANN001
        out: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if select(r) and (v := value(r)) is not None:
                out[r["method"]].append(v)
        return out

    def rows_of(kind: str, stage: str):  # noqa: ANN202
        return lambda r: r["stage"] == stage and space_kind(r["space"]) == kind

    settings = [
        ("Subspace optimization, single-task (seen)", "single", rows_of("single", "optimize")),
        ("Held-out seed: optimization, single-task (seen)", "single", rows_of("heldout", "optimize")),
        ("Held-out seed: optimization, % of the mean over seeds", "single", rows_of("heldout", "optimize"), of_mean),
        ("Cross-method transfer, single-task", "transfer", rows_of("single", "transfer")),
        ("Held-out seed: cross-method transfer, single-task", "transfer", rows_of("heldout", "transfer")),
        ("Multi-task subspace, unseen tasks", "multi", rows_of("multi", "optimize")),
        ("Multi-task cross-method transfer, unseen", "multi-transfer", rows_of("multi", "transfer")),
        ("From-scratch projections: optimization, single-task (seen)", "single", rows_of("scratch-single", "optimize")),
        ("From-scratch projections, held-out seed: optimization, single-task", "single",
         rows_of("scratch-heldout", "optimize")),
        ("From-scratch projections, held-out seed: % of the mean over seeds", "single",
         rows_of("scratch-heldout", "optimize"), of_mean),
        ("From-scratch projections: transfer, single-task", "transfer", rows_of("scratch-single", "transfer")),
        ("From-scratch projections, held-out seed: transfer, single-task", "transfer",
         rows_of("scratch-heldout", "transfer")),
        ("From-scratch projections: multi-task, unseen tasks", "multi", rows_of("scratch-multi", "optimize")),
        ("From-scratch projections: multi-task transfer, unseen", "multi-transfer", rows_of("scratch-multi", "transfer")),
        ("PCA subspace (same d), unseen tasks", None, rows_of("pca", "optimize")),
        ("Random Fastfood subspace (same d), unseen", None, rows_of("random", "optimize")),
    ]  # fmt: skip
    table = [["setting", *methods, "avg", "paper avg"]]
    for label, paper, select, *value in settings:
        found = ratios(select, *value)
        if not found and ("from-scratch" in label.lower() or "held-out" in label.lower()):
            continue  # `find --init random` or `find --which heldout` was not run
        every = [v for m in methods for v in found.get(m, [])]
        paper_avg = PAPER.get(paper or "", {}).get("avg")
        table.append([label, *(_cell(found.get(m, [])) for m in methods), _cell(every),
                      f"{paper_avg:.1f}" if paper_avg else "-"])  # fmt: skip
    unseen = {r["task"] for r in rows if space_kind(r["space"]) == "multi"}
    for label, tasks in (
        ("The fixed task head alone, all tasks", None),
        ("The fixed task head alone, unseen tasks", unseen),
    ):
        head = _head_ratios(store, methods, tasks)
        every = [v for m in methods for v in head.get(m, [])]
        table.append([label, *(_cell(head.get(m, [])) for m in methods), _cell(every), "-"])
    table.append(["Paper, single-task (adapter / LoRA / prefix)",
                  *(f"{PAPER['single'][m]:.1f}" if m in PAPER["single"] else "-" for m in methods), "84.9", "84.9"])  # fmt: skip
    return table


def _head_ratios(store: Store, methods: list[str], tasks: set[str] | None = None) -> dict[str, list[float]]:
    sols = {key: r["score"] for key, r in reference_solutions(store).items()}
    out: dict[str, list[float]] = defaultdict(list)
    for (task, method), score in sols.items():
        if method in methods and (task, "head") in sols and (tasks is None or task in tasks):
            if (value := share(sols[(task, "head")], score)) is not None:
                out[method].append(value)
    return out


def gain_table(store: Store, methods: list[str]) -> list[list[str]]:
    """Share of each solution's gain over the fixed head that a subspace recovers: (score - head) / (original - head).

    The % of the original credits the head, which alone scores 50-90% of a solution here; this does
    not. Pairs whose solution did not beat the head are left out (the share is undefined there).
    The single-task rows (in-sample beside held-out) appear only in a store with held-out subspaces.
    """
    heads = {r["task"]: r["score"] for r in store.rows("subspace_solutions", method="head")}
    heldout = any(space_kind(r["name"]) == "heldout" for r in store.rows("subspace_spaces"))
    settings = []
    if heldout:  # the in-sample single-task row beside the held-out one
        settings += [("Subspace optimization, single-task (seen), in-sample", "single", "optimize"),
                     ("Held-out seed: optimization, single-task (seen)", "heldout", "optimize")]  # fmt: skip
    settings += [("Multi-task subspace, unseen tasks", "multi", "optimize"),
                 ("Multi-task cross-method transfer, unseen", "multi", "transfer"),
                 ("From-scratch projections: multi-task, unseen", "scratch-multi", "optimize"),
                 ("PCA subspace (same d), unseen tasks", "pca", "optimize"),
                 ("Random Fastfood subspace (same d), unseen", "random", "optimize")]  # fmt: skip
    table = [["setting", *methods, "avg"]]
    for label, kind, stage in settings:
        found: dict[str, list[float]] = defaultdict(list)
        for r in store.rows("subspace_results", stage=stage):
            head = heads.get(r["task"])
            if space_kind(r["space"]) == kind and head is not None and r["original"] > head:
                found[r["method"]].append((r["score"] - head) / (r["original"] - head))
        every = [v for m in methods for v in found[m]]
        table.append([label, *(_cell(found.get(m, [])) for m in methods), _cell(every)])
    return table


def task_table(store: Store, methods: list[str]) -> list[list[str]]:
    """Each task's solutions at the study's seed; with several seeds, their mean and count beside each score."""
    sols, seeds = reference_solutions(store), seed_scores(store)
    tasks = list(dict.fromkeys(t for t, _ in sols))
    budgets: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in store.rows("subspace_intrinsic"):
        budgets[r["task"]][r["steps"] or 0][r["d"]] = r["score"]
    # d90 at each task's largest step budget (runs at other budgets are listed, not mixed in)
    intrinsic = {t: b[max(b)] for t, b in budgets.items()}
    steps = {t: max(b) for t, b in budgets.items()}

    def score(t: str, m: str) -> str:
        if (t, m) not in sols:
            return "-"
        every = seeds[(t, m)]
        spread = f" (mean {mean(every):.3f} of {len(every)} seeds)" if len(every) > 1 else ""
        return f"{sols[(t, m)]['score']:.3f}{spread}"

    table = [["task", "metric", "head only", *methods, "SAID runs (d: score)", "steps", "d90"]]
    for t in tasks:
        scores = [sols[(t, m)]["score"] for m in methods if (t, m) in sols]
        head = sols.get((t, "head"), {}).get("score")
        runs = intrinsic.get(t, {})
        table.append([
            t, next(iter(sols[(t, m)]["metric"] for m in ["head", *methods] if (t, m) in sols)),
            f"{head:.3f}" if head is not None else "-",
            *(score(t, m) for m in methods),
            ", ".join(f"{d}: {s:.3f}" for d, s in sorted(runs.items())) or "-",
            str(steps[t] or "?") if t in steps else "-",
            _d90(runs, max(scores) if scores else None, head),
        ])  # fmt: skip
    return table


def _d90(runs: dict[int, float], reference: float | None, head: float | None) -> str:
    if not runs or reference is None or head is None:
        return "-"
    if reference <= head:
        return "n/a (no gain over head)"
    target = head + 0.9 * (reference - head)
    hits = [d for d, s in runs.items() if s >= target]
    return str(min(hits)) if hits else f"> {max(runs)}"


def transfer_matrix(store: Store, methods: list[str], kind: str = "single") -> list[list[str]] | None:
    """Per (source, receiving) method pair, the receiver's % of its own solution; None when `kind` has no transfers."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in store.rows("subspace_results", stage="transfer"):
        if space_kind(r["space"]) == kind and (value := of_original(r)) is not None:
            cells[(r["source"], r["method"])].append(value)
    if not cells and kind not in ("single", "multi"):
        return None
    table = [["found through \\ used through", *methods]]
    for s in methods:
        table.append([s, *("-" if s == m else _cell(cells.get((s, m), [])) for m in methods)])
    return table


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def _html_table(table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def build(store: Store, methods: list[str], out: str | Path, figures: list[str | Path] = ()) -> tuple[Path, Path]:
    """Write report.md and report.html (figures embedded as base64 PNG) into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    main = main_table(store, methods)
    legend = SAMPLE_NOTE if any("held-out" in row[0].lower() for row in main) else ""
    legend = " ".join(n for n in (legend, undefined_note(store)) if n)
    sections = [
        ("Subspace optimization and transfer (% of each method's own solution; (n) = runs averaged)", main, legend),
        ("Share of the gain over the fixed head recovered (%; (n) = runs averaged)", gain_table(store, methods), ""),
        ("Cross-method transfer, single-task subspaces", transfer_matrix(store, methods, "single"), ""),
        ("Cross-method transfer, held-out seed's single-task subspaces", transfer_matrix(store, methods, "heldout"), ""),
        ("Cross-method transfer, multi-task subspace on unseen tasks", transfer_matrix(store, methods, "multi"), ""),
        ("Solutions per task (evaluation sample) and intrinsic dimension", task_table(store, methods), ""),
    ]  # fmt: skip
    sections = [s for s in sections if s[1] is not None]
    md = ["# deltatune subspace report", ""]
    for title, table, note in sections:
        md += [f"## {title}", "", markdown(table), ""] + ([note, ""] if note else [])
    figures = [Path(f) for f in figures if Path(f).exists()]
    md += [f"![{f.stem}]({f.name})" for f in figures]
    atomic.write_file(out / "report.md", "\n".join(md) + "\n")  # a kill leaves the previous report whole
    style = "body{font-family:sans-serif;max-width:1100px}td,th{border:1px solid #ccc;padding:3px 6px}table{border-collapse:collapse}"
    parts = [f"<html><head><meta charset='utf-8'><style>{style}</style></head><body><h1>deltatune subspace report</h1>"]
    for title, table, note in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(table), f"<p>{html.escape(note)}</p>" if note else ""]
    for f in figures:
        data = base64.b64encode(f.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(f.stem)}</h2><img src='data:image/png;base64,{data}' style='max-width:100%'>")
    atomic.write_file(out / "report.html", "".join(parts) + "</body></html>\n")
    return out / "report.md", out / "report.html"
