"""A study file -> one self-contained HTML page (plots inlined as base64 PNG) and a Markdown twin.

The HTML travels alone (mail it, open it offline); the Markdown sits in a repository next to its
PNG files. Both say how many runs are still missing, so a partial study is never mistaken for a
finished one.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from ..core import atomic
from . import analyses as an
from . import comparisons as cmp

ANALYSIS_TABLES = {
    "performance": an.performance,
    "convergence": an.convergence,
    "efficiency": an.efficiency,
    "combination": cmp.combination,
    "transfer": cmp.transfer,
    "scaling": cmp.scaling,
}
FALLBACK_ANALYSES = list(ANALYSIS_TABLES)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plots(data: an.StudyData, wanted: list[str]) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG bytes) for every plot the chosen analyses draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    methods = data.methods()
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for model in data.models():
        tag = model.replace("/", "_")
        if "performance" in wanted:
            avg = an.method_averages(data, model)
            shown = [m for m in methods if not math.isnan(avg.get(m, math.nan))]
            if shown:
                fig, ax = plt.subplots(figsize=(7, 3.2))
                ax.bar(shown, [avg[m] for m in shown], color=[colors[m] for m in shown])
                ax.set_ylabel("average test score x100")
                ax.set_title(f"{data.name}: average over tasks ({model})")
                ax.tick_params(axis="x", rotation=30)
                out.append((f"performance-{tag}", f"Average score per method ({model})", _png(fig)))
        if "convergence" in wanted:
            curves = an.mean_curves(data, model)
            tasks = [t for t in data.tasks() if any((t, m) in curves for m in methods)]
            if tasks:
                cols = min(4, len(tasks))
                rows = math.ceil(len(tasks) / cols)
                fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
                for ax, t in zip(axes.flat, tasks, strict=False):
                    for m in methods:
                        if (t, m) in curves:
                            steps, vals = zip(*curves[(t, m)], strict=True)
                            ax.plot(steps, vals, marker=".", label=m, color=colors[m])
                    ax.set_title(t, fontsize=9)
                    ax.tick_params(labelsize=7)
                for ax in list(axes.flat)[len(tasks) :]:
                    ax.axis("off")
                axes.flat[0].legend(fontsize=6)
                fig.supxlabel("optimizer step")
                fig.supylabel("dev score x100")
                fig.tight_layout()
                out.append((f"convergence-{tag}", f"Dev score vs step per task and method ({model})", _png(fig)))
        if "transfer" in wanted:
            for method in sorted({r["method"] for r in data.runs if r["source_task"] and r["model"] == model}):
                tasks, gains = cmp.transfer_matrix(data, model, method)
                if not gains:
                    continue
                grid = [[gains.get((s, t), math.nan) for t in tasks] for s in tasks]
                bound = max(1.0, max(abs(v) for v in gains.values()))
                fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 2, 0.8 * len(tasks) + 1.5))
                im = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound)
                ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
                ax.set_yticks(range(len(tasks)), tasks)
                for i, row in enumerate(grid):
                    for j, v in enumerate(row):
                        if not math.isnan(v):
                            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=8)
                ax.set_xlabel("continued on")
                ax.set_ylabel("trained on")
                fig.colorbar(im, ax=ax, label="gain over scratch (x100)")
                ax.set_title(f"transfer of {method} deltas ({model})")
                out.append((f"transfer-{method}-{tag}", f"Transfer gains of {method} ({model})", _png(fig)))
    if "scaling" in wanted and len(data.models()) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sizes = {m: next(r["total"] for r in data.base if r["model"] == m) for m in data.models()}
        for meth in methods:
            pts = [(sizes[m], an.method_averages(data, m).get(meth, math.nan)) for m in data.models()]
            pts = [p for p in pts if not math.isnan(p[1])]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=meth, color=colors[meth])
        ax.set_xscale("log")
        ax.set_xlabel("backbone parameters")
        ax.set_ylabel("average score x100")
        ax.legend(fontsize=7)
        out.append(("scaling", "Average score vs model size", _png(fig)))
    return out


def _summary(data: an.StudyData) -> list[str]:
    lines = []
    missing = sum(v for k, v in data.counts.items() if k != "done")
    lines.append(
        f"{data.counts.get('done', 0)} runs done"
        + (
            f"; **{missing} not done** ({', '.join(f'{v} {k}' for k, v in data.counts.items() if k != 'done' and v)})"
            if missing
            else ""
        )
    )
    for model in data.models():
        order = an.ranking(data, model)
        if order:
            paper = [m for m in an.PAPER_RANKING if m in order]
            ours = [m for m in order if m in an.PAPER_RANKING]
            lines.append(f"{model}: ranking by average score: {' > '.join(order)}")
            if len(paper) > 1:
                lines.append(f"paper (T5-base) on the same methods: {' > '.join(paper)}; ours: {' > '.join(ours)}")
    return lines


def _md_table(t: an.Table) -> str:
    head = "| " + " | ".join(t.columns) + " |\n|" + "|".join("---" for _ in t.columns) + "|\n"
    body = "".join("| " + " | ".join(r) + " |\n" for r in t.rows)
    return f"### {t.title}\n\n{head}{body}\n{t.note}\n"


def _html_table(t: an.Table) -> str:
    def cell(text: str) -> str:
        text = html.escape(text)
        return f"<b>{text[2:-2]}</b>" if text.startswith("**") and text.endswith("**") else text.replace("**", "")

    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<h3>{html.escape(t.title)}</h3><table><tr>{head}</tr>{body}</table><p class=note>{html.escape(t.note)}</p>"


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}"
    ".note{color:#666;font-size:12px;max-width:900px}img{max-width:100%;border:1px solid #eee}"
)


def _write(path: Path, data: bytes) -> None:
    atomic.write_file(path, data)


def write_report(db: str | Path, out: str | Path | None = None, also: tuple[str | Path, ...] = ()) -> Path:
    """Write report.html and report.md (+ PNGs) for a study file (joined with the `also` files, e.g.
    the same study on another backbone); returns the HTML's path."""
    data = an.load(db, tuple(also))
    out = Path(out) if out else Path(db).with_name(Path(db).stem + "-report")
    out.mkdir(parents=True, exist_ok=True)
    wanted = data.spec.get("analyses") or FALLBACK_ANALYSES
    tables = [t for name in wanted for t in ANALYSIS_TABLES[name](data)]
    plots = _plots(data, wanted) if data.runs else []
    summary = _summary(data)
    spec_note = f"models {data.models()}, {len(data.tasks())} tasks, methods {data.methods()}"
    budget: Any = an.budget_of(data.spec)
    if data.spec.get("budgets"):  # joined stores (`--with`) trained under other budgets: each model's, not the first's
        budget = (
            "; ".join(f"{m}: {b}" for m, b in data.spec["budgets"].items()) + " (the joined studies' budgets differ)"
        )
    md = [f"# Study {data.name}\n", f"{data.spec.get('description', '')}\n", f"{spec_note}; budget {budget}\n"]
    md += [f"- {line}" for line in summary] + [""]
    page = [f"<h1>Study {html.escape(data.name)}</h1><p>{html.escape(data.spec.get('description', ''))}</p>"]
    page.append(f"<p class=note>{html.escape(spec_note)}; budget {html.escape(str(budget))}</p><ul>")
    page += [f"<li>{html.escape(line).replace('**', '')}</li>" for line in summary] + ["</ul>"]
    for t in tables:
        md.append(_md_table(t))
        page.append(_html_table(t))
    (out / "plots").mkdir(exist_ok=True)
    for stem, caption, png in plots:
        _write(out / "plots" / f"{stem}.png", png)
        md.append(f"![{caption}](plots/{stem}.png)\n")
        b64 = base64.b64encode(png).decode()
        page.append(
            f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
        )
    doc = f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(data.name)}</title><style>{CSS}</style></head><body>{''.join(page)}</body></html>"
    _write(out / "report.md", "\n".join(md).encode())
    _write(out / "report.html", doc.encode())
    return out / "report.html"
