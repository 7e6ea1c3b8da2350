"""The norm adapter: N(s + ad(N(s))) on a norm with input s (AdapterHub's seq_bn on a post-LN block)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import logits, loss, make_inputs, make_model

import deltatune as dt

HIDDEN, BOTTLENECK = 32, 24


def _perturb(dm: dt.DeltaModel, seed: int = 0) -> dt.DeltaModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dm.deltas.values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return dm


def test_defaults_take_every_norm_inside_the_blocks_with_exact_counts() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["norm_adapter"]())
    sites = dm.delta("default").sites
    assert sorted(sites) == [
        f"bert.encoder.layer.{i}.{where}.LayerNorm" for i in (0, 1) for where in ("attention.output", "output")
    ]  # not the embeddings' LayerNorm
    per_site = HIDDEN * BOTTLENECK + BOTTLENECK + BOTTLENECK * HIDDEN + HIDDEN
    assert set(sites.values()) == {per_site}
    assert sum(p.numel() for p in dm.deltas.parameters()) == 4 * per_site


def test_identity_at_init_and_only_the_delta_trains() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    before = logits(model, inputs)
    dm = dt.attach(model, dt.METHODS["norm_adapter"](), train_head=False)
    assert torch.equal(logits(dm, inputs), before)
    loss(dm, inputs).backward()
    with_grad = {n for n, p in dm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(n.startswith("deltas.default.") for n in with_grad)
    assert all(p.grad is None for n, p in dm.backbone.named_parameters())


def test_the_math_is_the_norm_of_its_input_plus_the_adapter_of_its_output() -> None:
    model = make_model("bert")
    name = "bert.encoder.layer.1.output.LayerNorm"
    dm = _perturb(dt.attach(model, dt.METHODS["norm_adapter"](targets=[name], bottleneck=4, non_linearity="gelu")))
    ln = dm.backbone.get_submodule(name)
    block = dm.delta("default").adapters[next(iter(dm.delta("default").adapters))]
    s = torch.randn(2, 5, HIDDEN)
    inner = torch.nn.functional.layer_norm(s, (HIDDEN,), ln.weight, ln.bias, ln.eps)
    ad = block.up(torch.nn.functional.gelu(block.down(inner)))
    want = torch.nn.functional.layer_norm(s + ad, (HIDDEN,), ln.weight, ln.bias, ln.eps)
    assert torch.allclose(ln(s), want, atol=1e-6)
    dm.disable("default")
    assert torch.allclose(ln(s), inner)


def test_save_and_load_give_the_same_outputs(tmp_path: Path) -> None:
    inputs = make_inputs(make_model("bert"))
    dm = _perturb(dt.attach(make_model("bert"), dt.METHODS["norm_adapter"](bottleneck=8, scaling=0.5)))
    dm.save_delta(tmp_path / "d")
    again = dt.load_delta(make_model("bert"), tmp_path / "d")
    assert torch.equal(logits(again, inputs), logits(dm, inputs))
    assert again.delta("default").config == dm.delta("default").config


def test_a_target_that_is_not_a_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="'bert.encoder.layer.0.output.dense' is a Linear, not a normalisation layer"):
        dt.attach(make_model("bert"), dt.METHODS["norm_adapter"](targets=["bert.encoder.layer.0.output.dense"]))
