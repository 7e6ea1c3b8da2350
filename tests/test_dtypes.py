"""Deltas on half-precision backbones keep float32 parameters (as PEFT's `autocast_adapter_dtype` keeps adapters).

Cast to the backbone's bf16, AdamW's small steps rounded away: on a bf16 Llama only 17% of LoRA's entries ever
moved in 20 steps at lr 1e-4 (2% at 1e-5), without an error. Every method computes with float32 parameters on
bf16/fp16 activations and hands the layer its own dtype back.
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_inputs, make_model

import deltatune as dt

KWARGS = {"prompt": {"num_tokens": 3}, "said": {"targets": ("attn.q",), "dim": 16}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(dt.METHODS))
def test_every_method_keeps_fp32_parameters_beside_half_weights(method: str, dtype: torch.dtype) -> None:
    model = make_model("llama", "lm").to(dtype)
    inputs = make_inputs(model)
    with torch.no_grad():
        base = model(**inputs).logits
    dm = dt.attach(model, method, **KWARGS.get(method, {}))
    assert {p.dtype for p in dm.delta().parameters() if p.is_floating_point()} == {torch.float32}
    with torch.no_grad():
        out = dm(**inputs).logits
    assert out.dtype == dtype
    if method not in ("prompt", "prefix"):  # identity at init (the virtual tokens change attention at once)
        assert torch.equal(out, base)
    dm.train()
    dm(**inputs).loss.backward()
    grads = [p.grad for p in dm.delta().parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_small_steps_on_a_bf16_backbone_move_every_entry() -> None:
    model = make_model("llama", "lm").to(torch.bfloat16)
    dm = dt.attach(model, "lora", r=4)
    with torch.no_grad():
        for n, p in dm.delta().named_parameters():
            if n.endswith("B"):
                p.normal_(0, 0.02)  # so that A gets gradients from the first step
    before = {n: p.detach().clone() for n, p in dm.delta().named_parameters()}
    optimizer = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-4)
    inputs = make_inputs(model)
    dm.train()
    for _ in range(20):
        dm(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = [float((p != before[n]).float().mean()) for n, p in dm.delta().named_parameters()]
    assert min(moved) > 0.99, moved
