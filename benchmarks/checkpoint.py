"""Delta checkpoints: save and load time, and file size against the tensors' own bytes.

A LoRA r8 delta on the query and value projections is saved and loaded with deltatune and, beside
it, with PEFT (`save_pretrained`, `PeftModel.from_pretrained`), interleaved. Loading attaches to a
backbone already in memory, which is how a server swaps deltas; the detach after each load is not
timed. Sizes are also reported for the other methods' default configs.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deltatune as dt
from deltatune.core.targeting import resolve

from .models import is_cls, load, share_frozen

SIZE_SLACK = 16 * 1024  # bytes allowed beyond the tensors themselves (header + JSON)
METHODS = ("lora", "ia3", "bitfit", "layernorm", "adapter", "prefix", "prompt")


def _folder_bytes(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}


def _timed(cases: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]], repeats: int) -> dict[str, list[float]]:
    """Like `harness.interleave`, with an untimed cleanup after each call (detaching what was loaded)."""
    times: dict[str, list[float]] = {n: [] for n in cases}
    names = list(cases)
    for r in range(repeats + 1):  # the first round warms up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            op, cleanup = cases[name]
            gc.collect()
            start = time.perf_counter()
            result = op()
            elapsed = time.perf_counter() - start
            cleanup(result)
            if r:
                times[name].append(elapsed)
    return times


def run(models: list[str], *, quick: bool, repeats: int, device: str = "cpu", log: Any = print) -> dict[str, Any]:
    results = {}
    for name in models:
        with tempfile.TemporaryDirectory(prefix="deltatune-bench-") as tmp:
            results[name] = measure(name, Path(tmp), repeats, device, log)
    return results


def measure(name: str, root: Path, repeats: int, device: str, log: Any) -> dict[str, Any]:
    import peft

    base = load(name).to(device).eval()
    task = "SEQ_CLS" if is_cls(base) else "CAUSAL_LM"
    dm = dt.attach(share_frozen(base), dt.LoRAConfig(targets=("attn.q", "attn.v"), r=8))
    pcfg = peft.LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=resolve(base, ("attn.q", "attn.v")))
    pm = peft.get_peft_model(share_frozen(base), pcfg)
    dm.save_delta(root / "ours")
    pm.save_pretrained(root / "peft")
    target_dm = dt.DeltaModel(share_frozen(base))
    target_peft = share_frozen(base)
    cases = {
        "deltatune-save": (lambda: dm.save_delta(root / "ours"), lambda _: None),
        "peft-save": (lambda: pm.save_pretrained(root / "peft"), lambda _: None),
        "deltatune-load": (
            lambda: dt.load_delta(target_dm, root / "ours", name="loaded"),
            lambda _: target_dm.detach("loaded"),
        ),
        "peft-load": (lambda: peft.PeftModel.from_pretrained(target_peft, root / "peft"), lambda m: m.unload()),
    }
    times = _timed(cases, repeats)
    summary = {n: {"min_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3} for n, t in times.items()}
    lora_params = dm.delta_parameters()
    sizes = {"lora": _size_row(lora_params, _folder_bytes(root / "ours"))}
    sizes["peft-lora"] = {"files": _folder_bytes(root / "peft")}
    for method in METHODS[1:]:
        try:
            other = dt.attach(share_frozen(base), dt.get_config(method))
            other.save_delta(root / method)
            sizes[method] = _size_row(other.delta_parameters(), _folder_bytes(root / method))
        except Exception as err:
            sizes[method] = {"error": f"{type(err).__name__}: {err}"}
    log(f"[io/{name}] LoRA r8 (q, v): {lora_params} parameters, {repeats} repeats")
    for n, row in summary.items():
        log(f"  {n:<16} min {row['min_ms']:7.1f} ms   median {row['median_ms']:7.1f} ms")
    for method, row in sizes.items():
        if "limit_bytes" in row:
            log(
                f"  size {method:<10} {row['weights_bytes']:>10} B weights, {row['total_bytes']:>10} B folder; "
                f"limit {row['limit_bytes']} B: {'ok' if row['within_limit'] else 'OVER'}"
            )
    return {"times_s": times, "summary": summary, "sizes": sizes}


def _size_row(params: int, files: dict[str, int], bytes_per_param: int = 4) -> dict[str, Any]:
    """The target: the whole folder within params x bytes + 16 KiB."""
    total = sum(files.values())
    limit = params * bytes_per_param + SIZE_SLACK
    return {
        "parameters": params,
        "files": files,
        "weights_bytes": files.get("delta.safetensors", 0),
        "total_bytes": total,
        "limit_bytes": limit,
        "within_limit": total <= limit,
    }
