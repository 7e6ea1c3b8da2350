"""LoRA, the low-rank adapter and SAID: closed-form counts, merge exactness, projections."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.fastfood import Fastfood, fwht


def _randomize(dm: dt.DeltaModel, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta().parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---- LoRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,r,expected",
    [
        ("bert", 8, 2 * 2 * 8 * (32 + 32)),  # 2 layers x (query, value) x r (in + out)
        ("gpt2", 8, 2 * 8 * (32 + 96)),  # the fused c_attn: in 32, out 3 x 32
        ("llama", 4, 2 * (4 * (32 + 32) + 4 * (32 + 16))),  # v_proj has 2 kv heads x 8 = 16 outputs
        ("t5", 2, 4 * 2 * 2 * (32 + 32)),  # encoder and decoder self-attention
    ],
)
def test_lora_parameter_count_matches_closed_form(arch: str, r: int, expected: int) -> None:
    dm = dt.attach(make_model(arch), dt.METHODS["lora"](r=r), train_head=False)
    assert dm.trainable_parameters() == expected


@pytest.mark.parametrize("arch,head", [("bert", "cls"), ("gpt2", "lm"), ("llama", "lm"), ("t5", "lm"), ("bart", "cls")])
def test_lora_merge_matches_unmerged_and_unmerge_restores(arch: str, head: str) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm = dt.attach(model, dt.METHODS["lora"](targets=("attn.q", "attn.v", "ffn.out")))
    _randomize(dm)
    unmerged = logits(dm, inputs)
    dm.merge()
    assert dm.delta().merged
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.unmerge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_lora_merge_twice_and_unmerge_unmerged_are_errors() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
    with pytest.raises(dt.DeltaError, match="not merged"):
        dm.unmerge()
    dm.merge()
    with pytest.raises(dt.DeltaError, match="already merged"):
        dm.merge()
    with pytest.raises(dt.DeltaError, match="unmerge this delta before removing it"):
        dm.detach()


def test_lora_dropout_is_stochastic_in_training_and_off_in_eval() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    for module in model.modules():  # backbone dropout off: only LoRA's dropout acts
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    dm = dt.attach(model, dt.METHODS["lora"](dropout=0.5))
    _randomize(dm)
    dm.train()
    a, b = logits(dm, inputs), logits(dm, inputs)
    assert not torch.equal(a, b)
    model.eval()  # the model users hold, switched to eval: the deltas follow it (as PEFT's layers inside it do)
    assert torch.equal(logits(dm, inputs), logits(dm, inputs))
    dm.train()
    dm.eval()
    assert torch.equal(logits(dm, inputs), logits(dm, inputs))


def test_lora_on_a_non_linear_module_names_the_fix() -> None:
    with pytest.raises(ValueError, match="not a linear layer; target projections"):
        dt.attach(make_model("bert"), dt.METHODS["lora"](targets=("ln",)))


def test_lora_scaling_is_alpha_over_r() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"](r=4, alpha=32))
    assert all(layer.scaling == 8.0 for layer in dm.delta().layers.values())


# ---- low-rank adapter ------------------------------------------------------------------------
@pytest.mark.parametrize("bottleneck,rank", [(24, 1), (8, 2)])
def test_lowrank_adapter_parameter_count_matches_closed_form(bottleneck: int, rank: int) -> None:
    d = 32
    per_site = 2 * rank * (d + bottleneck) + bottleneck + d  # two rank-r products plus two biases
    dm = dt.attach(
        make_model("bert"), dt.METHODS["lowrank_adapter"](bottleneck=bottleneck, rank=rank), train_head=False
    )
    assert dm.trainable_parameters() == 2 * 2 * per_site  # 2 layers x (attention output, FFN output)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "bart"])
def test_linear_lowrank_adapter_merges_exactly(arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm = dt.attach(model, dt.METHODS["lowrank_adapter"](non_linearity="identity", rank=2))
    _randomize(dm)
    unmerged = logits(dm, inputs)
    dm.merge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.unmerge()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_nonlinear_lowrank_adapter_refuses_to_merge() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lowrank_adapter"]())
    with pytest.raises(dt.DeltaError, match="non_linearity='identity'"):
        dm.merge()


def test_lowrank_adapter_without_a_bias_to_absorb_refuses_to_merge() -> None:
    dm = dt.attach(make_model("llama"), dt.METHODS["lowrank_adapter"](non_linearity="identity"))
    _randomize(dm)
    with pytest.raises(dt.DeltaError, match="has no bias"):
        dm.merge()


@pytest.mark.parametrize(
    "kwargs,fragment", [({"non_linearity": "swish"}, "must be one of"), ({"rank": 30}, "cannot exceed bottleneck")]
)
def test_lowrank_adapter_bad_config(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        dt.METHODS["lowrank_adapter"](**kwargs).validate()


# ---- Fastfood and SAID ----------------------------------------------------------------------
def test_fwht_is_its_own_inverse_up_to_n() -> None:
    x = torch.randn(3, 64)
    torch.testing.assert_close(fwht(fwht(x)), 64 * x, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(6))


@pytest.mark.parametrize("d,D", [(16, 1000), (100, 5000), (1000, 300), (64, 64)])
def test_fastfood_projection_preserves_norms_on_average(d: int, D: int) -> None:
    proj = Fastfood(d, D, seed=7)
    x = torch.randn(200, d)
    ratios = proj(x).norm(dim=-1) / x.norm(dim=-1)
    assert proj(x).shape == (200, D)
    assert abs(ratios.pow(2).mean().item() - 1.0) < 0.25


def test_fastfood_is_linear_and_regenerated_from_its_seed() -> None:
    a, b, c = Fastfood(32, 500, seed=1), Fastfood(32, 500, seed=1), Fastfood(32, 500, seed=2)
    x, y = torch.randn(32), torch.randn(32)
    torch.testing.assert_close(a(2 * x + y), 2 * a(x) + a(y), rtol=1e-4, atol=1e-5)
    assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))
    assert a.state_dict() == {}  # nothing random is ever saved


@pytest.mark.parametrize("structured", [True, False])
def test_said_parameter_count_is_dim_plus_one_scale_per_tensor(structured: bool) -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["said"](dim=50, structured=structured), train_head=False)
    tensors = 2 * 6 * 2  # 2 layers x (q, k, v, o, ffn in, ffn out) x (weight, bias)
    assert dm.trainable_parameters() == 50 + (tensors if structured else 0)
    assert set(dm.delta_state_dict()) == {"theta", "scales"}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_said_merge_matches_unmerged(arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["said"](dim=40))
    _randomize(dm, scale=1.0)
    unmerged = logits(dm, inputs)
    dm.merge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.unmerge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)


def test_said_update_size_follows_theta() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["said"](dim=64, structured=False))
    delta = dm.delta()
    with torch.no_grad():
        delta.theta.copy_(torch.randn(64))
    total = math.sqrt(sum(delta.update(i).pow(2).sum().item() for i in range(len(delta.projections))))
    per_tensor = delta.theta.norm().item() * math.sqrt(len(delta.projections))
    assert 0.7 < total / per_tensor < 1.3  # each tensor's update has about |theta|'s norm


def test_said_dim_beyond_the_values_it_moves_is_refused() -> None:
    """dim=10**7 on a tiny BERT was accepted: ten million trainable numbers projected onto 16,832 values."""
    with pytest.raises(ValueError, match=r"SAID dim=10,000,000 exceeds the 16,832 values of the 24 tensors"):
        dt.attach(make_model("bert"), dt.METHODS["said"](dim=10**7))
    dt.attach(make_model("bert"), dt.METHODS["said"](dim=16_832))  # the bound itself is allowed
