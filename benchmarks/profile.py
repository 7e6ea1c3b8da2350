"""Where a training step's time goes: torch.profiler over one step per configuration.

Ops are grouped into what the step is made of (matrix products, attention, elementwise and
normalisation, the optimizer, everything else); the top ops by self time are kept as well.
The tables go to benchmarks/results/profile-<model>.txt and into the JSON report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

from .harness import write_text
from .models import SPECS, build, inputs, load

VARIANTS = ("full", "floor", "lora", "peft-lora", "ia3", "bitfit", "layernorm")
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::_softmax", "aten::softmax"),
    "optimizer": ("aten::_fused_adamw", "aten::_foreach", "Optimizer.step"),
}
TOP = 15


def _group(op: str) -> str:
    for group, prefixes in GROUPS.items():
        if op.startswith(prefixes):
            return group
    return "other"


def run(models: list[str], *, quick: bool, repeats: int, device: str = "cpu", log: Any = print) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in models:
        batch, seq = SPECS[name].shape(quick)
        base = load(name).to(device)
        data = {k: t.to(device) for k, t in inputs(base, batch, seq).items()}
        report, text = {}, []
        for v in VARIANTS:
            step = build(v, base).step(data)
            step()  # warm-up: allocator and optimizer state
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                step()
            events = [e for e in prof.key_averages() if not e.key.startswith(("ProfilerStep", "autograd::engine"))]
            total = sum(e.self_cpu_time_total for e in events)
            groups: dict[str, float] = {}
            for e in events:
                groups[_group(e.key)] = groups.get(_group(e.key), 0.0) + e.self_cpu_time_total
            top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
            report[v] = {
                "self_cpu_ms": total / 1e3,
                "groups_ms": {g: t / 1e3 for g, t in sorted(groups.items())},
                "top": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in top],
            }
            text.append(
                f"== {v}: self CPU {total / 1e3:.1f} ms; "
                + ", ".join(f"{g} {t / 1e3:.1f}" for g, t in sorted(groups.items()))
            )
            text.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP))
        log("\n".join(line for line in text if line.startswith("==")))
        out = Path(__file__).parent / "results" / f"profile-{name}{'-quick' if quick else ''}.txt"
        write_text(out, f"{name} batch {batch}x{seq}\n" + "\n".join(text))
        results[name] = {"batch": batch, "seq": seq, "variants": report, "tables": str(out.name)}
    return results
