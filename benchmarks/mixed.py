"""Mixed-batch serving: one forward whose rows use different LoRA deltas, against a single delta.

With N deltas attached, row i of the batch is routed to delta i mod N (`DeltaModel.forward(...,
delta_ids=...)`); the baseline is the same batch through a model carrying one delta, all rows on
it. PEFT's mixed batch (`adapter_names=`) over the same N adapters runs beside it, with PEFT's
single-adapter forward as its own baseline. Every delta is perturbed away from zero so that no
row could skip its work.
"""

from __future__ import annotations

from typing import Any

import torch

import deltatune as dt
from deltatune.core.targeting import resolve

from .harness import interleave, summarize, table
from .infer import _perturb, forward
from .models import SPECS, inputs, is_cls, load, share_frozen

COUNTS = (1, 8, 32)
# 32 rows so that 32 deltas each get a row; SmolLM2 at shorter requests to keep the forward affordable
SHAPES = {"minilm-l6": (32, 128), "smollm2-135m": (32, 64)}


def supported() -> str | None:
    """None when DeltaModel routes rows; else why this suite is skipped."""
    if not hasattr(dt.DeltaModel, "route"):
        return "DeltaModel.route is not available in this deltatune yet: the mixed suite is skipped"
    return None


def _ours(base: torch.nn.Module, n: int) -> dt.DeltaModel:
    dm = dt.DeltaModel(share_frozen(base))
    for i in range(n):
        torch.manual_seed(i)
        dm.add(f"d{i}", dt.LoRAConfig(targets=("attn.q", "attn.v"), r=8))
        _perturb(dm.delta(f"d{i}"))
    return dm.eval()


def _peft(base: torch.nn.Module, n: int) -> Any:
    import peft

    task = "SEQ_CLS" if is_cls(base) else "CAUSAL_LM"
    names = resolve(base, ("attn.q", "attn.v"))
    pm = None
    for i in range(n):
        cfg = peft.LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=names)
        if pm is None:
            pm = peft.get_peft_model(share_frozen(base), cfg, adapter_name=f"d{i}")
        else:
            pm.add_adapter(f"d{i}", cfg)
    _perturb(torch.nn.ModuleList(m for n_, m in pm.named_modules() if n_.endswith(("lora_A", "lora_B"))))
    return pm.eval()


def run(models: list[str], *, quick: bool, repeats: int, device: str = "cpu", log: Any = print) -> dict[str, Any]:
    reason = supported()
    if reason:
        log(f"[mixed] {reason}")
        return {name: {"skipped": reason} for name in models}
    return {name: measure(name, quick, repeats, device, log) for name in models}


def measure(name: str, quick: bool, repeats: int, device: str, log: Any) -> dict[str, Any]:
    batch, seq = SPECS[name].shape(True) if quick else SHAPES.get(name, SPECS[name].shape(False))
    base = load(name).to(device).eval()
    data = {k: t.to(device) for k, t in inputs(base, batch, seq, labels=False).items()}
    cases: dict[str, Any] = {}
    single = _ours(base, 1)
    single.set_active("d0")
    cases["single"] = forward(single, data)
    for n in COUNTS:
        ids = [f"d{i % n}" for i in range(batch)]
        cases[f"mixed-{n}"] = forward(_ours(base, n), data, delta_ids=ids)
    peft_errors = {}
    try:
        cases["peft-single"] = forward(_peft(base, 1), data)
        for n in COUNTS:
            cases[f"peft-mixed-{n}"] = forward(_peft(base, n), data, adapter_names=[f"d{i % n}" for i in range(batch)])
    except Exception as err:  # PEFT's mixed batches do not cover every architecture
        peft_errors["peft"] = f"{type(err).__name__}: {err}"
        cases = {k: v for k, v in cases.items() if not k.startswith("peft")}
    log(f"[mixed/{name}] batch {batch}x{seq}, {repeats} repeats")
    times = interleave(cases, repeats=repeats, warmup=2)
    summary = summarize(times, "single")
    log(table(summary, "single"))
    vs_peft = {}
    if "peft-single" in times:
        theirs = summarize({k: v for k, v in times.items() if k.startswith("peft")}, "peft-single")
        log("PEFT against its own single-adapter forward:\n" + table(theirs, "peft-single"))
        for n in COUNTS:
            pair = summarize({"ours": times[f"mixed-{n}"], "peft": times[f"peft-mixed-{n}"]}, "peft")["ours"]
            vs_peft[f"mixed-{n}/peft-mixed-{n}"] = {k: v for k, v in pair.items() if k.startswith("ratio")}
            log(f"  mixed-{n} / peft-mixed-{n}: x min {pair['ratio_min']:.3f}  x median {pair['ratio_median']:.3f}")
    return {
        "batch": batch,
        "seq": seq,
        "times_s": times,
        "summary": summary,
        "vs_peft": vs_peft,
        "errors": peft_errors,
    }
