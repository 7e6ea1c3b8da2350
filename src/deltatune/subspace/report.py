"""The study's tables in the paper's form (% of each method's own solution), as Markdown and HTML.

Every number is read back from the store, so the report can be rebuilt at any point of a run
(rows that are not there yet show as "-") and always says how many tasks each cell averages.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from statistics import mean

from .space import MULTI, SCRATCH_MULTI, space_kind
from .store import Store

PAPER = {  # Yi et al., % of the original method's performance (T5-base, 1,105,920-number solutions)
    "single": {"adapter": 88.5, "lora": 80.9, "prefix": 85.3, "avg": 84.9},
    "transfer": {"avg": 82.6},
    "multi": {"avg": 88.7},
    "multi-transfer": {"avg": 84.7},
}


def _cell(values: list[float]) -> str:
    return f"{100 * mean(values):.1f} ({len(values)})" if values else "-"


def main_table(store: Store, methods: list[str]) -> list[list[str]]:
    rows = store.rows("subspace_results")

    def ratios(select) -> dict[str, list[float]]:  # noqa: ANN001
        out: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if select(r):
                out[r["method"]].append(r["ratio"])
        return out

    def rows_of(kind: str, stage: str):  # noqa: ANN202
        return lambda r: r["stage"] == stage and space_kind(r["space"]) == kind

    settings = [
        ("Subspace optimization, single-task (seen)", "single", rows_of("single", "optimize")),
        ("Cross-method transfer, single-task", "transfer", rows_of("single", "transfer")),
        ("Multi-task subspace, unseen tasks", "multi", rows_of("multi", "optimize")),
        ("Multi-task cross-method transfer, unseen", "multi-transfer", rows_of("multi", "transfer")),
        ("From-scratch projections: optimization, single-task (seen)", "single", rows_of("scratch-single", "optimize")),
        ("From-scratch projections: transfer, single-task", "transfer", rows_of("scratch-single", "transfer")),
        ("From-scratch projections: multi-task, unseen tasks", "multi", rows_of("scratch-multi", "optimize")),
        (
            "From-scratch projections: multi-task transfer, unseen",
            "multi-transfer",
            rows_of("scratch-multi", "transfer"),
        ),
        ("PCA subspace (same d), unseen tasks", None, rows_of("pca", "optimize")),
        ("Random Fastfood subspace (same d), unseen", None, rows_of("random", "optimize")),
    ]
    table = [["setting", *methods, "avg", "paper avg"]]
    for label, paper, select in settings:
        found = ratios(select)
        if not found and label.startswith("From-scratch"):
            continue  # `find --init random` was not run
        every = [v for m in methods for v in found.get(m, [])]
        paper_avg = PAPER.get(paper or "", {}).get("avg")
        table.append([label, *(_cell(found.get(m, [])) for m in methods), _cell(every),
                      f"{paper_avg:.1f}" if paper_avg else "-"])  # fmt: skip
    unseen = {r["task"] for r in rows if r["space"] == MULTI}
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
    sols = {(r["task"], r["method"]): r["score"] for r in store.rows("subspace_solutions")}
    out: dict[str, list[float]] = defaultdict(list)
    for (task, method), score in sols.items():
        if method in methods and (task, "head") in sols and score and (tasks is None or task in tasks):
            out[method].append(sols[(task, "head")] / score)
    return out


def gain_table(store: Store, methods: list[str]) -> list[list[str]]:
    """Share of each solution's gain over the fixed head that a subspace recovers: (score - head) / (original - head).

    The % of the original credits the head, which alone scores 50-90% of a solution here; this does
    not. Pairs whose solution did not beat the head are left out (the share is undefined there).
    """
    heads = {r["task"]: r["score"] for r in store.rows("subspace_solutions", method="head")}
    settings = [("Multi-task subspace, unseen tasks", MULTI, "optimize"),
                ("Multi-task cross-method transfer, unseen", MULTI, "transfer"),
                ("From-scratch projections: multi-task, unseen", SCRATCH_MULTI, "optimize"),
                ("PCA subspace (same d), unseen tasks", "pca", "optimize"),
                ("Random Fastfood subspace (same d), unseen", "random", "optimize")]  # fmt: skip
    table = [["setting", *methods, "avg"]]
    for label, space, stage in settings:
        found: dict[str, list[float]] = defaultdict(list)
        for r in store.rows("subspace_results", space=space, stage=stage):
            head = heads.get(r["task"])
            if head is not None and r["original"] > head:
                found[r["method"]].append((r["score"] - head) / (r["original"] - head))
        every = [v for m in methods for v in found[m]]
        table.append([label, *(_cell(found.get(m, [])) for m in methods), _cell(every)])
    return table


def task_table(store: Store, methods: list[str]) -> list[list[str]]:
    sols = {(r["task"], r["method"]): r for r in store.rows("subspace_solutions")}
    tasks = list(dict.fromkeys(t for t, _ in sols))
    budgets: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in store.rows("subspace_intrinsic"):
        budgets[r["task"]][r["steps"] or 0][r["d"]] = r["score"]
    # d90 at each task's largest step budget (runs at other budgets are listed, not mixed in)
    intrinsic = {t: b[max(b)] for t, b in budgets.items()}
    steps = {t: max(b) for t, b in budgets.items()}
    table = [["task", "metric", "head only", *methods, "SAID runs (d: score)", "steps", "d90"]]
    for t in tasks:
        scores = [sols[(t, m)]["score"] for m in methods if (t, m) in sols]
        head = sols.get((t, "head"), {}).get("score")
        runs = intrinsic.get(t, {})
        table.append([
            t, next(iter(sols[(t, m)]["metric"] for m in ["head", *methods] if (t, m) in sols)),
            f"{head:.3f}" if head is not None else "-",
            *(f"{sols[(t, m)]['score']:.3f}" if (t, m) in sols else "-" for m in methods),
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


def transfer_matrix(store: Store, methods: list[str], single: bool = True) -> list[list[str]]:
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in store.rows("subspace_results", stage="transfer"):
        if space_kind(r["space"]) == ("single" if single else "multi"):
            cells[(r["source"], r["method"])].append(r["ratio"])
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
    sections = [
        ("Subspace optimization and transfer (% of each method's own solution; (n) = runs averaged)",
         main_table(store, methods)),
        ("Share of the gain over the fixed head recovered (%; (n) = runs averaged)", gain_table(store, methods)),
        ("Cross-method transfer, single-task subspaces", transfer_matrix(store, methods, True)),
        ("Cross-method transfer, multi-task subspace on unseen tasks", transfer_matrix(store, methods, False)),
        ("Solutions per task (evaluation sample) and intrinsic dimension", task_table(store, methods)),
    ]  # fmt: skip
    md = ["# deltatune subspace report", ""]
    for title, table in sections:
        md += [f"## {title}", "", markdown(table), ""]
    figures = [Path(f) for f in figures if Path(f).exists()]
    md += [f"![{f.stem}]({f.name})" for f in figures]
    (out / "report.md").write_text("\n".join(md) + "\n")
    style = "body{font-family:sans-serif;max-width:1100px}td,th{border:1px solid #ccc;padding:3px 6px}table{border-collapse:collapse}"
    parts = [f"<html><head><meta charset='utf-8'><style>{style}</style></head><body><h1>deltatune subspace report</h1>"]
    for title, table in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(table)]
    for f in figures:
        data = base64.b64encode(f.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(f.stem)}</h2><img src='data:image/png;base64,{data}' style='max-width:100%'>")
    (out / "report.html").write_text("".join(parts) + "</body></html>\n")
    return out / "report.md", out / "report.html"
