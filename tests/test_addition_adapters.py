"""Adapters (sequential, parallel), Compacter and (IA)^3: counts, placement, math, merging, errors.

Tiny models: 2 layers, hidden d = 32, FFN width 64 (GPT-2: 4 d = 128); Llama has 2 KV heads of 8,
so its k/v projections are 16 wide.
"""

from __future__ import annotations

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.layers import linear_dims
from deltatune.core.targeting import side_of

D, FFN, LAYERS = 32, 64, 2
SITES = {"houlsby": 2, "pfeiffer": 1}
ADAPTER_METHODS = ("adapter", "parallel_adapter", "compacter")


def _delta(dm: dt.DeltaModel) -> dt.Delta:
    return dm.delta("default")


def _perturb(delta: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _capture(module: torch.nn.Module, store: dict, key: str, *, inputs: bool = False):
    if inputs:
        return module.register_forward_pre_hook(lambda m, a: store.__setitem__(key, a[0].detach().clone()))
    return module.register_forward_hook(lambda m, a, o: store.__setitem__(key, o.detach().clone()))


# -- sequential adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapter_parameter_count_matches_closed_form(arch: str, placement: str) -> None:
    b = 24
    dm = dt.attach(make_model(arch), dt.get_config("adapter", placement=placement, bottleneck=b), train_head=False)
    per_site = D * b + b + b * D + D
    assert dm.trainable_parameters() == LAYERS * SITES[placement] * per_site
    assert set(_delta(dm).sites.values()) == {per_site}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_houlsby_adds_attention_output_sites_that_pfeiffer_omits(arch: str) -> None:
    model = make_model(arch)
    attn_o, ffn_out = set(dt.resolve(model, "attn.o")), set(dt.resolve(model, "ffn.out"))
    pfeiffer = set(_delta(dt.attach(make_model(arch), dt.get_config("adapter", placement="pfeiffer"))).sites)
    houlsby = set(_delta(dt.attach(make_model(arch), dt.get_config("adapter"))).sites)
    assert pfeiffer == ffn_out and len(ffn_out) == LAYERS
    assert houlsby == attn_o | ffn_out and not attn_o & ffn_out


def test_explicit_targets_override_placement() -> None:
    dm = dt.attach(make_model("bert"), dt.get_config("adapter", placement="pfeiffer", targets=("attn.o",)))
    assert set(_delta(dm).sites) == set(dt.resolve(dm.backbone, "attn.o"))


def test_adapter_layers_restricts_sites_to_chosen_layers() -> None:
    dm = dt.attach(make_model("bert"), dt.get_config("adapter", layers=[1]))
    assert len(_delta(dm).sites) == 2 and all(".layer.1." in s for s in _delta(dm).sites)


@pytest.mark.parametrize("non_linearity", ["relu", "tanh"])
def test_adapter_rewrites_sublayer_output_as_h_plus_scaled_up_act_down_h(non_linearity: str) -> None:
    model = make_model("bert")
    dm = dt.attach(model, dt.get_config("adapter", placement="pfeiffer", non_linearity=non_linearity, scaling=0.5))
    _perturb(_delta(dm))
    name = dt.resolve(model, "ffn.out")[0]
    module, block = model.get_submodule(name), _delta(dm).adapters[name.replace(".", "__")]
    x = torch.randn(3, FFN)
    with torch.no_grad():
        h = torch.nn.functional.linear(x, module.weight, module.bias)
        act = {"relu": torch.relu, "tanh": torch.tanh}
        expected = h + 0.5 * block.up(act[non_linearity](block.down(h)))
        torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(module(x), h)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_decoder_cross_attention_target_touches_only_the_decoder(arch: str) -> None:
    dm = dt.attach(make_model(arch, "lm"), dt.get_config("adapter", targets=("decoder:xattn.o",), bottleneck=8))
    sites = _delta(dm).sites
    assert len(sites) == LAYERS and {side_of(s) for s in sites} == {"decoder"}
    assert set(sites) == set(dt.resolve(dm.backbone, "xattn.o"))
    assert dm.trainable_parameters() == LAYERS * (D * 8 + 8 + 8 * D + D)


def test_encoder_cross_attention_target_fails_loudly() -> None:
    with pytest.raises(dt.TargetError, match="matches no module"):
        dt.attach(make_model("t5", "lm"), dt.get_config("adapter", targets=("encoder:xattn.o",)))


# -- identity at init, for every method here ------------------------------------------------------
@pytest.mark.parametrize("method", [*ADAPTER_METHODS, "ia3"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_identity_at_init_and_not_after_training_changes(method: str, arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs(model)
    before = logits(model, inputs)
    dm = dt.attach(model, dt.get_config(method))
    torch.testing.assert_close(logits(dm, inputs), before, rtol=0, atol=1e-6)
    _perturb(_delta(dm), std=0.5)
    assert (logits(dm, inputs) - before).abs().max() > 1e-4, "the delta's hooks do not reach the output"


# -- parallel adapter ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_parallel_adapter_parameter_count_matches_closed_form(arch: str) -> None:
    b = 24
    dm = dt.attach(make_model(arch), dt.get_config("parallel_adapter", bottleneck=b), train_head=False)
    # reads the FFN input (width d) and writes the FFN output (width d)
    assert dm.trainable_parameters() == LAYERS * (D * b + b + b * D + D)


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_parallel_adapter_adds_update_of_ffn_input_to_ffn_output(arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs(model)
    source, target = dt.resolve(model, "ffn.in")[0], dt.resolve(model, "ffn.out")[0]
    base: dict = {}
    handles = [_capture(model.get_submodule(source), base, "x", inputs=True)]
    handles.append(_capture(model.get_submodule(target), base, "out"))
    logits(model, inputs)
    for h in handles:
        h.remove()
    dm = dt.attach(model, dt.get_config("parallel_adapter"))
    _perturb(_delta(dm))
    assert _delta(dm).sources[target] == source
    got: dict = {}
    handle = _capture(model.get_submodule(target), got, "out")  # registered after, so runs after the delta's hook
    logits(dm, inputs)
    handle.remove()
    # only layer 0 of the first stack is compared: later layers see inputs changed by layer 0's adapter
    block = _delta(dm).adapters[target.replace(".", "__")]
    with torch.no_grad():
        expected = base["out"] + block(base["x"])  # block applies the paper's scaling s = 4 itself
    assert block.scaling == 4.0
    torch.testing.assert_close(got["out"], expected, rtol=1e-5, atol=1e-5)
    assert not _delta(dm)._cache, "cached FFN inputs outlive the forward pass"


def test_parallel_adapter_on_llama_hooks_one_of_the_two_ffn_inputs_per_block() -> None:
    model = make_model("llama")
    dm = dt.attach(model, dt.get_config("parallel_adapter"))
    assert all(s.endswith("gate_proj") for s in _delta(dm).sources.values())
    assert len(set(_delta(dm).sources.values())) == LAYERS


def test_parallel_adapter_without_paired_input_module_raises() -> None:
    config = dt.get_config("parallel_adapter", input_from=(r"re:.*layer\.0\.intermediate\.dense",))
    with pytest.raises(ValueError, match=r"layer\.1\.output\.dense.*no module matching input_from"):
        dt.attach(make_model("bert"), config)


# -- Compacter ---------------------------------------------------------------------------------------
def _compacter_count(n: int, r: int, b: int, sites: int, d: int = D) -> int:
    down = n * (d // n * r + r * b // n) + b
    up = n * (b // n * r + r * d // n) + d
    return 2 * n**3 + sites * (down + up)


@pytest.mark.parametrize(
    "arch,placement,n,r",
    [("bert", "houlsby", 4, 1), ("bert", "pfeiffer", 4, 1), ("llama", "houlsby", 4, 1), ("bert", "houlsby", 2, 3)],
)
def test_compacter_parameter_count_matches_closed_form(arch: str, placement: str, n: int, r: int) -> None:
    config = dt.get_config("compacter", placement=placement, phm_dim=n, phm_rank=r, bottleneck=24)
    dm = dt.attach(make_model(arch), config, train_head=False)
    expected = _compacter_count(n, r, 24, LAYERS * SITES[placement])
    assert dm.trainable_parameters() == expected == dm.delta_parameters()
    assert sum(_delta(dm).sites.values()) == expected - 2 * n**3  # shared rules belong to no single site


def test_compacter_shared_rules_are_one_tensor_each_and_get_gradients_from_every_site() -> None:
    dm = dt.attach(make_model("bert"), dt.get_config("compacter"))
    delta = _delta(dm)
    rule_keys = [k for k in delta.state_dict() if "phm_rule" in k]
    assert sorted(rule_keys) == ["phm_rule_down", "phm_rule_up"]
    _perturb(delta)  # make every up factor nonzero so gradients reach both rules
    for block in delta.adapters.values():
        x = torch.randn(2, D)
        grads = torch.autograd.grad(block(x).square().sum(), [delta.phm_rule_down, delta.phm_rule_up])
        assert all(g.abs().sum() > 0 for g in grads)


def test_compacter_kronecker_weight_matches_explicit_sum_of_kron_products() -> None:
    dm = dt.attach(make_model("bert"), dt.get_config("compacter", phm_rank=2))
    delta = _delta(dm)
    _perturb(delta)
    down = next(iter(delta.adapters.values())).down
    explicit = sum(torch.kron(delta.phm_rule_down[i], down.s[i] @ down.t[i]) for i in range(4))
    torch.testing.assert_close(down.weight(), explicit)


def test_compacter_bottleneck_not_divisible_by_phm_dim_raises() -> None:
    with pytest.raises(ValueError, match=r"bottleneck \(30\).*phm_dim \(4\)"):
        dt.attach(make_model("bert"), dt.get_config("compacter", bottleneck=30))


def test_compacter_hidden_size_not_divisible_by_phm_dim_raises() -> None:
    model = make_model("bert")
    with pytest.raises(ValueError, match=r"hidden size 32 .*phm_dim 3"):
        dt.attach(model, dt.get_config("compacter", bottleneck=24, phm_dim=3))
    assert not any(h for m in model.modules() for h in m._forward_hooks.values()), "a failed attach left hooks"


# -- (IA)^3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,expected",
    [
        ("bert", LAYERS * (D + D + FFN)),  # k, v outputs; ffn.out input
        ("llama", LAYERS * (16 + 16 + FFN)),  # grouped-query k, v are 2 heads x 8
        ("gpt2", LAYERS * (3 * D + 4 * D)),  # fused q|k|v scaled as one; ffn.out input is 4 d
    ],
)
def test_ia3_parameter_count_matches_closed_form(arch: str, expected: int) -> None:
    model = make_model(arch)
    dm = dt.attach(model, dt.get_config("ia3"), train_head=False)
    assert dm.trainable_parameters() == expected
    ffn_out = set(dt.resolve(model, "ffn.out"))
    for site, count in _delta(dm).sites.items():
        in_f, out_f = linear_dims(model.get_submodule(site))
        assert count == (in_f if site in ffn_out else out_f)


def test_ia3_scales_value_output_and_ffn_out_input() -> None:
    model = make_model("bert")
    value, ffn_out = dt.resolve(model, "attn.v")[0], dt.resolve(model, "ffn.out")[0]
    v_mod, f_mod = model.get_submodule(value), model.get_submodule(ffn_out)
    dm = dt.attach(model, dt.get_config("ia3"))
    _perturb(_delta(dm))
    lv, lf = _delta(dm).vectors[value.replace(".", "__")], _delta(dm).vectors[ffn_out.replace(".", "__")]
    with torch.no_grad():
        x, z = torch.randn(3, D), torch.randn(3, FFN)
        torch.testing.assert_close(v_mod(x), torch.nn.functional.linear(x, v_mod.weight, v_mod.bias) * lv)
        torch.testing.assert_close(f_mod(z), torch.nn.functional.linear(z * lf, f_mod.weight, f_mod.bias))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_ia3_merge_matches_unmerged_and_unmerge_restores_weights(arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm = dt.attach(model, dt.get_config("ia3"))
    _perturb(_delta(dm), std=0.3)
    unmerged = logits(dm, inputs)
    dm.merge()
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters()), "merge changed no weight"
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.unmerge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[n], rtol=0, atol=1e-6)


def test_ia3_with_a_zero_scale_refuses_a_merge_it_could_not_undo() -> None:
    # the merge used to succeed and the unmerge to be refused: the backbone stayed changed for good
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.get_config("ia3"))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    vector = next(iter(_delta(dm).vectors.values()))
    with torch.no_grad():
        vector[0] = 0.0
    with pytest.raises(dt.DeltaError, match=r"not merged: .*\|l\| < 1e-08.*merge_and_unload\(\)"):
        dm.merge()
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        vector[0] = 1.0
    dm.merge()
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        vector[0] = 0.0  # changed while merged: the unmerge still refuses rather than divide by it
    with pytest.raises(dt.DeltaError, match=r"\|l\| < 1e-08.*reload the backbone"):
        dm.unmerge()
    assert all(torch.equal(merged[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        vector[0] = 1.0
    dm.unmerge()
    with torch.no_grad():
        vector[0] = 0.0
    expected = logits(dm, inputs)
    torch.testing.assert_close(logits(dm.merge_and_unload(), inputs), expected, rtol=0, atol=1e-5)


def test_adapters_refuse_to_merge() -> None:
    dm = dt.attach(make_model("bert"), dt.get_config("adapter"))
    with pytest.raises(dt.DeltaError, match="cannot be merged"):
        dm.merge()


# -- bad configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_unknown_non_linearity_raises(method: str) -> None:
    with pytest.raises(
        ValueError, match=r"non_linearity must be one of relu, gelu, tanh, silu, gelu_tanh, got 'swish'"
    ):
        dt.attach(make_model("bert"), dt.get_config(method, non_linearity="swish"))


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_zero_bottleneck_raises(method: str) -> None:
    with pytest.raises(ValueError, match=r"bottleneck must be a positive integer, got 0"):
        dt.attach(make_model("bert"), dt.get_config(method, bottleneck=0))


@pytest.mark.parametrize("method", ["adapter", "compacter"])
def test_unknown_placement_raises(method: str) -> None:
    with pytest.raises(ValueError, match=r"placement must be one of houlsby, pfeiffer"):
        dt.attach(make_model("bert"), dt.get_config(method, placement="after_everything"))


def test_adapter_on_a_module_without_known_width_raises() -> None:
    with pytest.raises(ValueError, match=r"adapter target .*Dropout"):
        dt.attach(make_model("bert"), dt.get_config("adapter", targets=(r"re:.*layer\.0\.output\.dropout",)))
