"""Inference latency: the backbone alone against merged and unmerged deltas, PEFT's LoRA beside them.

Every delta is perturbed away from its identity initialisation first, so no configuration could
skip its work. Forward passes run in eval mode under `torch.inference_mode()`; the headline is
each configuration over the backbone alone.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import deltatune as dt

from .harness import interleave, summarize, table
from .models import SPECS, inputs, is_cls, load, share_frozen


def _perturb(module: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.01)


def _deltatune(base: torch.nn.Module, config: dt.DeltaConfig, merged: bool = False) -> torch.nn.Module:
    model = copy.deepcopy(base) if merged else share_frozen(base)  # merging writes the weights
    dm = dt.attach(model, config)
    _perturb(dm.delta())
    if merged:
        dm.merge()
    return dm.eval()


def _peft_lora(base: torch.nn.Module) -> torch.nn.Module:
    import peft

    from deltatune.core.targeting import resolve

    task = "SEQ_CLS" if is_cls(base) else "CAUSAL_LM"
    names = resolve(base, ("attn.q", "attn.v"))
    cfg = peft.LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=names)
    pm = peft.get_peft_model(share_frozen(base), cfg)
    _perturb(torch.nn.ModuleList(m for n, m in pm.named_modules() if n.endswith(("lora_A", "lora_B"))))
    return pm.eval()


def models_for(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    lora = dt.LoRAConfig(targets=("attn.q", "attn.v"), r=8)
    return {
        "backbone": base.eval(),
        "lora-merged": _deltatune(base, lora, merged=True),
        "lora": _deltatune(base, lora),
        "peft-lora": _peft_lora(base),
        "ia3-merged": _deltatune(base, dt.IA3Config(), merged=True),
        "ia3": _deltatune(base, dt.IA3Config()),
        "adapter": _deltatune(base, dt.AdapterConfig()),
    }


def forward(model: torch.nn.Module, data: dict[str, torch.Tensor], **extra: Any) -> Any:
    """One timed call: a forward without autograd, as a server runs it."""

    def call() -> None:
        with torch.inference_mode():
            model(**data, **extra)

    return call


def measure(name: str, quick: bool, repeats: int, device: str, log: Any) -> dict[str, Any]:
    batch, seq = SPECS[name].shape(quick)
    base = load(name).to(device)
    data = {k: t.to(device) for k, t in inputs(base, batch, seq, labels=False).items()}
    variants = models_for(base)
    log(f"[infer/{name}] batch {batch}x{seq}, {repeats} repeats")
    times = interleave({v: forward(m, data) for v, m in variants.items()}, repeats=repeats, warmup=2)
    summary = summarize(times, "backbone")
    log(table(summary, "backbone"))
    return {"batch": batch, "seq": seq, "times_s": times, "summary": summary}


def run(models: list[str], *, quick: bool, repeats: int, device: str = "cpu", log: Any = print) -> dict[str, Any]:
    return {name: measure(name, quick, repeats, device, log) for name in models}
