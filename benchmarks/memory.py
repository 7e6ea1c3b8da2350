"""Peak memory of one training configuration, measured alone in a fresh process.

Peaks of configurations sharing a process mask each other (memory freed by one stays resident
for the next), so the train suite runs this module once per configuration:
`python -m benchmarks.memory MODEL VARIANT BATCH SEQ [--device cuda]` prints one JSON line.

Reported: RSS after loading the backbone, peak RSS (VmHWM) over two training steps (the second
one holds the optimizer state), their difference, and the bytes autograd saved for the backward
pass that are not parameters (activation memory, the same on any machine). On CUDA the peak is
`torch.cuda.max_memory_allocated` instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from .harness import rss_mb
from .models import build, inputs, load


def saved_activation_bytes(step_forward: Any, params: set[int]) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_forward()
    loss.backward()
    return sum(seen.values())


def probe(model_name: str, variant: str, batch: int, seq: int, device: str = "cpu", steps: int = 2) -> dict[str, Any]:
    torch.manual_seed(0)
    base = load(model_name).to(device)
    cuda = device.startswith("cuda")
    loaded = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    v = build(variant, base, shared=False)
    data = {k: t.to(device) for k, t in inputs(base, batch, seq).items()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step = v.step(data)
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM")
    params = {p.untyped_storage().data_ptr() for p in v.model.parameters()}
    saved = saved_activation_bytes(lambda: v.model(**data).loss, params)
    v.model.zero_grad(set_to_none=True)
    return {
        "variant": variant,
        "memory": "cuda_max_allocated" if cuda else "rss",
        "loaded_mb": round(loaded, 1),
        "peak_mb": round(peak, 1),
        "peak_over_loaded_mb": round(peak - loaded, 1),
        "saved_activations_mb": round(saved / 2**20, 1),
        "saved_activations_bytes": saved,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("variant")
    parser.add_argument("batch", type=int)
    parser.add_argument("seq", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = probe(args.model, args.variant, args.batch, args.seq, args.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
