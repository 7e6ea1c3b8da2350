"""Training step time and peak memory: full fine-tuning, each deltatune method, PEFT beside it.

A step is forward + backward + AdamW step + zero_grad on one fixed batch. Every configuration
is timed in this process, round-robin; each configuration's memory is measured in its own fresh
process (`benchmarks.memory`). Headline ratios: each method over full fine-tuning, and each
deltatune method over PEFT's implementation of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch

from .harness import interleave, summarize, table
from .models import SPECS, VARIANTS, build, inputs, load

PEFT_TWIN = {"lora": "peft-lora", "ia3": "peft-ia3", "prefix": "peft-prefix", "prompt": "peft-prompt"}
PEFT_TWIN["layernorm"] = "peft-ln"
PEFT_TWIN |= {m: f"peft-{m}" for m in ("dora", "loha", "lokr", "oft", "vera", "adalora")}


def memory_probe(model: str, variant: str, batch: int, seq: int, device: str) -> dict[str, Any]:
    """Run `benchmarks.memory` in a fresh interpreter; an error comes back as {"error": ...}."""
    cmd = [sys.executable, "-m", "benchmarks.memory", model, variant, str(batch), str(seq), "--device", device]
    cmd += ["--threads", str(torch.get_num_threads())]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def twin_ratios(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """deltatune method over PEFT's implementation of it, from the same interleaved run."""
    out = {}
    for ours, theirs in PEFT_TWIN.items():
        if ours in times and theirs in times:
            pair = summarize({ours: times[ours], theirs: times[theirs]}, theirs)[ours]
            out[f"{ours}/{theirs}"] = {k: v for k, v in pair.items() if k.startswith("ratio")}
    return out


def run(
    models: list[str],
    *,
    quick: bool,
    repeats: int,
    variants: list[str] | None = None,
    memory: bool = True,
    device: str = "cpu",
    log: Any = print,
) -> dict[str, Any]:
    variants = variants or list(VARIANTS)
    results: dict[str, Any] = {}
    for name in models:
        spec = SPECS[name]
        batch, seq = spec.shape(quick)
        base = load(name).to(device)
        data = {k: t.to(device) for k, t in inputs(base, batch, seq).items()}
        built, errors = {}, {}
        for v in variants:
            try:
                built[v] = build(v, base)
            except Exception as err:  # a PEFT method that does not support this architecture
                errors[v] = f"{type(err).__name__}: {err}"
                log(f"[train/{name}] {v} skipped: {errors[v]}")
        cases = {v: b.step(data) for v, b in built.items()}
        for v in list(cases):  # warm-up; a first step can still fail (a shape PEFT gets wrong): drop it alone
            try:
                cases[v]()
            except Exception as err:
                errors[v] = f"{type(err).__name__}: {err}"
                log(f"[train/{name}] {v} failed: {errors[v]}")
                del cases[v], built[v]
        trainable = {v: sum(p.numel() for p in b.model.parameters() if p.requires_grad) for v, b in built.items()}
        log(f"[train/{name}] batch {batch}x{seq}, {len(cases)} configurations, {repeats} repeats")
        times = interleave(cases, repeats=repeats, warmup=0)
        baseline = "full" if "full" in times else None
        summary = summarize(times, baseline)
        log(table(summary, baseline))
        twins = twin_ratios(times)
        for pair, r in twins.items():
            log(f"  {pair:<24} x min {r['ratio_min']:.3f}  x median {r['ratio_median']:.3f}")
        del built, cases
        mem: dict[str, Any] = {}
        if memory:
            for v in times:
                mem[v] = memory_probe(name, v, batch, seq, device)
                m = mem[v]
                log(
                    f"  memory {v:<12} "
                    + (
                        m.get("error")
                        or f"peak {m['peak_mb']:.0f} MiB (+{m['peak_over_loaded_mb']:.0f} over loaded), "
                        f"saved activations {m['saved_activations_mb']:.0f} MiB"
                    )
                )
        results[name] = {
            "batch": batch,
            "seq": seq,
            "trainable_parameters": trainable,
            "times_s": times,
            "summary": summary,
            "vs_peft": twins,
            "memory": mem,
            "errors": errors,
        }
    return results
