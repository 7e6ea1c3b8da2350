"""Markdown tables from a benchmark JSON: `python -m benchmarks.report benchmarks/results/<file>.json`.

docs/benchmarks.md is written from this output, so every number there can be traced to a file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ratio(row: dict[str, float]) -> str:
    return f"{row['ratio_min']:.3f} / {row['ratio_median']:.3f} / {row['ratio_paired_median']:.3f}"


def _time_table(result: dict[str, Any], baseline: str) -> list[str]:
    lines = [f"| config | min ms | median ms | x {baseline} (min / median / paired) |", "|---|---:|---:|---:|"]
    for name, row in result["summary"].items():
        ratio = _ratio(row) if "ratio_min" in row else "-"
        lines.append(f"| {name} | {row['min_s'] * 1e3:.0f} | {row['median_s'] * 1e3:.0f} | {ratio} |")
    return lines


def train(result: dict[str, Any]) -> list[str]:
    lines = _time_table(result, "full")
    lines[0] += " trainable | peak RSS MiB (over loaded) | saved activations MiB |"
    lines[1] += "---:|---:|---:|"
    for i, name in enumerate(result["summary"], start=2):
        mem = result.get("memory", {}).get(name, {})
        peak = f"{mem['peak_mb']:.0f} (+{mem['peak_over_loaded_mb']:.0f})" if "peak_mb" in mem else "-"
        saved = f"{mem['saved_activations_mb']:.0f}" if "saved_activations_mb" in mem else "-"
        lines[i] += f" {result['trainable_parameters'].get(name, '-'):,} | {peak} | {saved} |"
    if result.get("vs_peft"):
        lines += ["", "| deltatune / PEFT | x (min / median / paired) |", "|---|---:|"]
        lines += [f"| {k} | {_ratio(r)} |" for k, r in result["vs_peft"].items()]
    for name, err in result.get("errors", {}).items():
        lines.append(f"\n{name} did not run: `{err[:200]}`")
    return lines


def io(result: dict[str, Any]) -> list[str]:
    lines = ["| operation | min ms | median ms |", "|---|---:|---:|"]
    lines += [f"| {n} | {r['min_ms']:.1f} | {r['median_ms']:.1f} |" for n, r in result["summary"].items()]
    lines += [
        "",
        "| method | parameters | delta.safetensors B | folder B | limit B | within |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for method, r in result["sizes"].items():
        if "limit_bytes" in r:
            within = "yes" if r["within_limit"] else "no"
            lines.append(
                f"| {method} | {r['parameters']:,} | {r['weights_bytes']:,} | {r['total_bytes']:,} | "
                f"{r['limit_bytes']:,} | {within} |"
            )
        elif "files" in r:
            lines.append(f"| {method} | | | {sum(r['files'].values()):,} | | |")
    return lines


def _paired(times: dict[str, list[float]], ours: str, theirs: str) -> list[float]:
    return sorted(a / b for a, b in zip(times[ours], times[theirs], strict=True))


def adapterhub(report: dict[str, Any]) -> str:
    """`benchmarks.adapterhub`'s JSON: deltatune / AdapterHub per method, exactness, memory."""
    m = report["machine"]
    out = [
        f"Measured {m['date']}, {m['cpu_count']} CPUs, torch {m['torch']}, transformers {m['transformers']}, "
        f"adapters {m['adapters']}, 1 thread; 1-minute load average {m['loadavg_start'][0]:.1f} at the start, "
        f"{m.get('loadavg_end', [0.0])[0]:.1f} at the end; {report['args']['repeats']} interleaved repeats.",
    ]
    for suite, base in (("train", "full"), ("infer", "backbone")):
        r = report[suite]
        out += ["", f"{suite} ({r['batch']} x {r['seq']}): median ms [min-max], dt / AH, each over {base} (paired)", ""]
        out += [f"| method | AdapterHub | deltatune | dt/AH min / median / paired [range] | AH/{base} | dt/{base} |"]
        out += ["|---|---:|---:|---:|---:|---:|"]
        b = r["summary"][base]
        out.append(
            f"| {base} | {b['median_s'] * 1e3:.0f} [{b['min_s'] * 1e3:.0f}-{max(r['times_s'][base]) * 1e3:.0f}] | | | | |"
        )
        for method, v in r["dt_over_ah"].items():
            a, d = r["summary"][f"ah-{method}"], r["summary"][f"dt-{method}"]
            p = _paired(r["times_s"], f"dt-{method}", f"ah-{method}")
            cells = [
                f"{x['median_s'] * 1e3:.0f} [{x['min_s'] * 1e3:.0f}-{max(r['times_s'][k]) * 1e3:.0f}]"
                for x, k in ((a, f"ah-{method}"), (d, f"dt-{method}"))
            ]
            out.append(
                f"| {method} | {cells[0]} | {cells[1]} | {_ratio(v)} [{p[0]:.2f}-{p[-1]:.2f}] | "
                f"{a['ratio_paired_median']:.3f} | {d['ratio_paired_median']:.3f} |"
            )
    out += ["", "| method | trainable (AH = dt) | max \\|logit diff\\| dt->AH, AH->dt | merged dt vs AH | merged vs "]
    out[-1] += "unmerged dt, AH | the delta's own effect | saved for backward MiB AH, dt | peak RSS MiB AH, dt |"
    out += ["|---|---:|---|---|---|---:|---|---|"]
    for method, e in report["exactness"].items():
        merged = f"{e['max_logit_diff_merged_dt_vs_ah']:.2g}" if "max_logit_diff_merged_dt_vs_ah" in e else "-"
        own = "-"
        if merged != "-":
            own = f"{e['max_logit_diff_dt_merged_vs_unmerged']:.2g}, {e['max_logit_diff_ah_merged_vs_unmerged']:.2g}"
        saved = report.get("saved_activations_mb", {})
        rss = report.get("peak_rss", {})
        peaks = ", ".join(
            f"{rss[k]['peak_mb']:.0f}" if "peak_mb" in rss.get(k, {}) else "-" for k in (f"ah-{method}", f"dt-{method}")
        )
        out.append(
            f"| {method} | {e['trainable_deltatune']:,} | {e['max_logit_diff_dt_to_ah']:.2g}, "
            f"{e['max_logit_diff_ah_to_dt']:.2g} | {merged} | {own} | {e['max_logit_diff_delta_off']:.2g} | "
            f"{saved.get(f'ah-{method}', '-')}, {saved.get(f'dt-{method}', '-')} | {peaks} |"
        )
    return "\n".join(out) + "\n"


def render(report: dict[str, Any]) -> str:
    if "exactness" in report:
        return adapterhub(report)
    m = report["machine"]
    out = [
        f"Measured {m['date']} on {m['platform']}, {m['cpu_count']} CPUs; torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}; "
        f"1-minute load average {m['loadavg_start'][0]:.1f} at the start, {m.get('loadavg_end', [0.0])[0]:.1f} at the end.",
    ]
    for suite, models in report["suites"].items():
        for model, result in models.items():
            if "skipped" in result:
                out += ["", f"### {suite}: {model}", "", f"Skipped: {result['skipped']}"]
                continue
            shape = f", batch {result['batch']}x{result['seq']}" if "batch" in result else ""
            extra = f", {result.get('repeats', '?')} repeats, {result.get('threads', '?')} thread(s)"
            out += ["", f"### {suite}: {model}{shape}{extra}", ""]
            if suite == "train":
                out += train(result)
            elif suite == "io":
                out += io(result)
            else:
                out += _time_table(result, "backbone" if suite == "infer" else "single")
                for k, r in result.get("vs_peft", {}).items():
                    out.append(f"\n{k}: x {_ratio(r)} (min / median / paired)")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m benchmarks.report RESULT.json", file=sys.stderr)
        return 2
    print(render(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
