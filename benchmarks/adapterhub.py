"""deltatune against AdapterHub's `adapters`, side by side: `python -m benchmarks.adapterhub [--quick]`.

Needs `adapters` (1.3.0 pins transformers 4.57): without it, one line says so and the run exits 0.
Per method (LoRA r8 q/v, seq_bn, double_seq_bn, par_bn, ia3; `benchmarks.adapterhub_models`), on one
backbone in one process, single-threaded, both libraries' models carrying the same weights:

* training step (forward + backward + AdamW step + zero_grad, train mode, delta and head trainable;
  both optimizers `deltatune.train.trainer.adamw` over the trainable tensors), full fine-tuning beside;
* inference (eval, `torch.inference_mode()`), unmerged, and merged where both libraries merge
  (LoRA, (IA)^3); the backbone alone beside;
* exactness: max |logit diff| deltatune -> AdapterHub, AdapterHub -> deltatune, merged;
* memory: bytes autograd saves for backward (in process; deterministic) and, per configuration
  in a fresh process, peak RSS over two steps (`--no-memory` skips those).

Timings are interleaved round-robin (`benchmarks.harness.interleave`); the headline is deltatune /
AdapterHub per method over min, median and the paired median. JSON: benchmarks/results/adapterhub-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from . import adapterhub_models as ahm
from .harness import interleave, machine, rss_mb, summarize, write_json
from .memory import saved_activation_bytes
from .models import build, inputs, load

RESULTS = Path(__file__).parent / "results"
SHAPES = {"minilm-l6": ((16, 128), (32, 128)), "tiny-bert": ((4, 16), (4, 16))}  # (train, infer) batch x seq
NOTE = "interleaved round-robin on a shared machine; read ratios (paired median first), not absolute ms"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adapterhub", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm-l6", choices=sorted(SHAPES))
    p.add_argument("--methods", default=",".join(ahm.METHODS), help=f"subset of {','.join(ahm.METHODS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per configuration (default 7, quick 2)")
    p.add_argument("--quick", action="store_true", help="tiny-bert, 2 repeats, no memory probes: a smoke run")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-RSS probes")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/adapterhub-<date>.json)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one memory probe, JSON line
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.no_memory = "tiny-bert", True
    args.repeats = args.repeats or (2 if args.quick else 7)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.methods = args.methods.split(",")
    bad = [m for m in args.methods if m not in ahm.METHODS]
    if bad:
        p.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(ahm.METHODS)}")
    return args


def _step(model: torch.nn.Module, data: dict[str, torch.Tensor], lr: float = 1e-3) -> Any:
    from deltatune.train.trainer import adamw

    opt = adamw(ahm.trainable(model), lr=lr)

    def run() -> torch.Tensor:
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return run


def _forward(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> Any:
    def run() -> None:
        with torch.inference_mode():
            model(**data)

    return run


def _saved_mb(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = saved_activation_bytes(lambda: model(**data).loss, params)
    model.zero_grad(set_to_none=True)
    return round(saved / 2**20, 1)


def probe(model_name: str, case: str, batch: int, seq: int) -> dict[str, Any]:
    """Peak RSS of one training configuration, alone in this process: `full`, `ah-<method>` or `dt-<method>`."""
    base = load(model_name)
    data = inputs(base, batch, seq)
    gc.collect()
    loaded = rss_mb()
    if case == "full":
        model = build("full", base, shared=False, optimizer=False).model
    else:
        side, method = case.split("-", 1)
        model = ahm.attach_dt(base, method) if side == "dt" else ahm.attach_ah(base, method)
        model.train()
    step = _step(model, data, lr=2e-5 if case == "full" else 1e-3)
    for _ in range(2):  # the second step holds the optimizer state
        step()
    peak = rss_mb("VmHWM")
    return {
        "case": case,
        "loaded_mb": round(loaded, 1),
        "peak_mb": round(peak, 1),
        "over_loaded_mb": round(peak - loaded, 1),
    }


def _probe_subprocess(model: str, case: str, batch: int, seq: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.adapterhub", "--model", model, "--probe", f"{case}:{batch}:{seq}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"case": case, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def _spread(samples: list[float]) -> dict[str, float]:
    return {"max_s": max(samples), "spread": (max(samples) - min(samples)) / statistics.median(samples)}


def versus(times: dict[str, list[float]], methods: list[str], suffix: str = "") -> dict[str, dict[str, float]]:
    """deltatune / AdapterHub per method, from the same interleaved run; the paired ratios' range is the noise."""
    out = {}
    for m in methods:
        ours, theirs = f"dt-{m}{suffix}", f"ah-{m}{suffix}"
        if ours in times and theirs in times:
            row = summarize({ours: times[ours], theirs: times[theirs]}, theirs)[ours]
            out[m + suffix] = {k: v for k, v in row.items() if k.startswith("ratio")}
            paired = [a / b for a, b in zip(times[ours], times[theirs], strict=True)]
            out[m + suffix] |= {"paired_low": min(paired), "paired_high": max(paired)}
    return out


def render(title: str, summary: dict[str, dict[str, float]], vs: dict[str, dict[str, float]], baseline: str) -> str:
    """One line per method: both libraries' medians [min-max], dt/AH ratios, each over the baseline (paired)."""
    head = f"{title}\n{'method':<16} {'AdapterHub ms':>22} {'deltatune ms':>22}  {'dt/AH min':>9} {'median':>7} "
    head += f"{'paired':>7} {'[range]':>13}  {'AH/' + baseline:>9} {'dt/' + baseline:>9}"
    lines = [head, f"{baseline:<16} {_ms(summary[baseline]):>22}"]
    for m, r in vs.items():
        a, d = summary[f"ah-{m}"], summary[f"dt-{m}"]
        lines.append(
            f"{m:<16} {_ms(a):>22} {_ms(d):>22}  {r['ratio_min']:>9.3f} {r['ratio_median']:>7.3f} "
            f"{r['ratio_paired_median']:>7.3f} [{r['paired_low']:.2f}-{r['paired_high']:.2f}]"
            f"  {a['ratio_paired_median']:>9.3f} {d['ratio_paired_median']:>9.3f}"
        )
    return "\n".join(lines)


def _ms(row: dict[str, float]) -> str:
    return f"{row['median_s'] * 1e3:.1f} [{row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f}]"


def _summary(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    summary = summarize(times, baseline)
    for name, row in summary.items():
        row.update(_spread(times[name]))
    return summary


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    (tb, ts), (ib, iseq) = SHAPES[args.model]
    report: dict[str, Any] = {"machine": machine(packages=("adapters",)), "note": NOTE, "model": args.model}
    report["args"] = {
        "methods": args.methods,
        "repeats": args.repeats,
        "train_shape": [tb, ts],
        "infer_shape": [ib, iseq],
    }
    base = load(args.model)
    data = inputs(base, tb, ts)
    check = inputs(base, 4, min(ts, 32), labels=False, seed=2)
    pairs = {m: ahm.pair(base, m, check) for m in args.methods}
    report["exactness"] = {m: p.info for m, p in pairs.items()}
    for m, p in pairs.items():
        i = p.info
        log(
            f"[{m}] config is AdapterHub's preset: {i['config_is_the_preset']}; trainable AH {i['trainable_adapterhub']:,}"
            f" dt {i['trainable_deltatune']:,}; max |logit diff| dt->AH {i['max_logit_diff_dt_to_ah']:.2g},"
            f" AH->dt {i['max_logit_diff_ah_to_dt']:.2g} (the delta moves them {i['max_logit_diff_delta_off']:.2g});"
            f" with the blocks' dropout as x * 0.5 {i['max_logit_diff_block_dropout_halved']:.2g}"
        )
    merged = {}  # before any training step: both libraries' merges start from the same weights
    for m in (m for m in ahm.MERGEABLE if m in pairs):
        ah_merged, dt_merged, info = ahm.merged(base, pairs[m], check)
        merged[m] = (ah_merged, dt_merged)
        report["exactness"][m].update(info)
        log(
            f"[{m} merged] max |logit diff| dt vs AH {info['max_logit_diff_merged_dt_vs_ah']:.2g}; merged vs unmerged:"
            f" dt {info['max_logit_diff_dt_merged_vs_unmerged']:.2g}, AH {info['max_logit_diff_ah_merged_vs_unmerged']:.2g}"
        )
    full = build("full", base)
    cases = {"full": _step(full.model, data, lr=2e-5)}
    for m, p in pairs.items():
        cases[f"ah-{m}"], cases[f"dt-{m}"] = _step(p.ah, data), _step(p.dt, data)
    report["saved_activations_mb"] = {name: _saved_mb(model, data) for name, model in _train_models(full, pairs)}
    log(f"[train] {args.model} batch {tb}x{ts}, {len(cases)} configurations, {args.repeats} repeats, 1 thread")
    times = interleave(cases, repeats=args.repeats, warmup=1)
    summary = _summary(times, "full")
    vs = versus(times, args.methods)
    report["train"] = {"batch": tb, "seq": ts, "times_s": times, "summary": summary, "dt_over_ah": vs}
    report["train"]["loadavg_end"] = list(os.getloadavg())
    log(render("training step (forward + backward + AdamW)", summary, vs, "full"))
    del full, cases
    gc.collect()
    report["infer"] = _infer(args, base, pairs, merged, ib, iseq, log)
    if not args.no_memory:
        report["peak_rss"] = {}
        for name in ["full", *(f"{s}-{m}" for m in args.methods for s in ("ah", "dt"))]:
            r = report["peak_rss"][name] = _probe_subprocess(args.model, name, tb, ts)
            log(
                f"  memory {name:<18} "
                + (r.get("error") or f"peak {r['peak_mb']:.0f} MiB (+{r['over_loaded_mb']:.0f})")
            )
    log("  saved for backward, MiB: " + ", ".join(f"{k} {v}" for k, v in report["saved_activations_mb"].items()))
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    return report


def _train_models(full: Any, pairs: dict[str, ahm.Pair]) -> list[tuple[str, torch.nn.Module]]:
    models = [("full", full.model)]
    for m, p in pairs.items():
        models += [(f"ah-{m}", p.ah), (f"dt-{m}", p.dt)]
    return models


def _infer(args: Any, base: Any, pairs: dict[str, ahm.Pair], merged: dict, batch: int, seq: int, log: Any) -> dict:
    data = inputs(base, batch, seq, labels=False)
    models: dict[str, torch.nn.Module] = {"backbone": base.eval()}
    for m, p in pairs.items():
        models[f"ah-{m}"], models[f"dt-{m}"] = p.ah.eval(), p.dt.eval()
    for m, (ah_merged, dt_merged) in merged.items():
        models[f"ah-{m}-merged"], models[f"dt-{m}-merged"] = ah_merged, dt_merged
    log(f"[infer] batch {batch}x{seq}, {len(models)} configurations, {args.repeats} repeats")
    times = interleave({k: _forward(v, data) for k, v in models.items()}, repeats=args.repeats, warmup=2)
    summary = _summary(times, "backbone")
    vs = versus(times, args.methods) | versus(times, list(ahm.MERGEABLE), "-merged")
    log(render("inference (eval, no grad)", summary, vs, "backbone"))
    return {"batch": batch, "seq": seq, "times_s": times, "summary": summary, "dt_over_ah": vs}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    if not ahm.available():
        print(
            "benchmarks.adapterhub: `adapters` is not installed; run it in an environment with adapters (transformers 4.57)"
        )
        return 0
    if args.probe:
        case, batch, seq = args.probe.split(":")
        print(json.dumps(probe(args.model, case, int(batch), int(seq))))
        return 0
    print(f"deltatune vs AdapterHub on {args.model}: {NOTE}; 1-minute load average {os.getloadavg()[0]:.1f}")
    report = run(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or RESULTS / f"adapterhub-{args.model}-{stamp}.json")
    write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
