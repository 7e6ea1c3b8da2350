"""Specification methods: BitFit, LayerNorm tuning, selective (last-k) tuning and diff pruning.

Counts are checked against closed forms over the tiny configs (hidden 32, ffn 64, 2 layers per
stack; Llama: 4 heads of 8 with 2 key/value heads; GPT-2's MLP is 4 x 32 = 128 wide).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny import logits, loss, make_inputs, make_model, same_state, state

import deltatune as dt
from deltatune.core.delta import DeltaError
from deltatune.core.targeting import TargetError

H, F, L = 32, 64, 2  # hidden, ffn width, layers per stack of every tiny model
HEADS = {
    ("bert", "cls"): ("classifier",),
    ("roberta", "cls"): ("classifier",),
    ("distilbert", "cls"): ("pre_classifier", "classifier"),
    ("gpt2", "cls"): ("score",),
    ("bart", "cls"): ("classification_head",),
    ("gpt2", "lm"): ("lm_head",),
    ("bart", "lm"): ("lm_head",),
}
SPEC = ("bitfit", "layernorm", "selective", "diff_pruning")
MERGE_ARCHS = ("bert", "gpt2", "llama", "t5", "bart")


def _attach(arch: str, method: str, head: str = "cls", **kwargs) -> dt.DeltaModel:
    return dt.attach(make_model(arch, head), dt.METHODS[method](**kwargs))


def _delta(dm: dt.DeltaModel, name: str = "default"):
    return dm.deltas[name]


def _perturb(dm: dt.DeltaModel, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# -- BitFit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,head", list(HEADS), ids=[f"{a}-{h}" for a, h in HEADS])
def test_bitfit_count_equals_every_bias_outside_the_head(arch: str, head: str) -> None:
    model = make_model(arch, head)
    heads = tuple(h + "." for h in HEADS[(arch, head)])
    expected = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith(heads))
    dm = dt.attach(model, dt.METHODS["bitfit"](), train_head=False)
    assert dm.delta_parameters() == dm.trainable_parameters() == expected > 0


def test_bitfit_count_on_tiny_bert_matches_hand_count() -> None:
    # embeddings LN + per layer (q, k, v, attn-out, LN, intermediate, output, LN) + pooler
    per_layer = 4 * H + H + F + H + H
    assert _attach("bert", "bitfit").delta_parameters() == H + L * per_layer + H == 640


def test_bitfit_state_dict_keys_name_the_backbone_biases() -> None:
    dm = _attach("bert", "bitfit")
    keys = set(dm.delta_state_dict())
    assert "delta.bert__encoder__layer__0__attention__self__query__bias" in keys
    assert not any("classifier" in k for k in keys)
    assert all(k.endswith("__bias") for k in keys)


@pytest.mark.parametrize("head", ["cls", "lm"])
def test_bitfit_on_llama_adds_out_features_sized_biases(head: str) -> None:
    dm = _attach("llama", "bitfit", head)
    q, kv, o = 4 * 8, 2 * 8, H  # 4 query heads and 2 key/value heads of width 8
    assert dm.delta_parameters() == L * (q + kv + kv + o + F + F + H) == 512
    assert len(_delta(dm).delta) == 0 and len(_delta(dm).added) == 7 * L
    assert not any(n.endswith("bias") for n, _ in dm.backbone.named_parameters())


@pytest.mark.parametrize("head", ["cls", "lm"])
def test_bitfit_on_t5_adds_biases_to_every_projection_but_not_the_head(head: str) -> None:
    dm = _attach("t5", "bitfit", head)
    encoder = 4 * H + F + H  # q, k, v, o, wi, wo
    decoder = 8 * H + F + H  # self and cross attention, wi, wo
    assert dm.delta_parameters() == L * (encoder + decoder) == 1152
    assert not any("head" in k for k in _delta(dm).added)


def test_bitfit_added_bias_offsets_the_layer_output() -> None:
    dm = _attach("llama", "bitfit")
    delta = _delta(dm)
    key = "model__layers__0__self_attn__q_proj__bias"
    with torch.no_grad():
        delta.added[key].copy_(torch.arange(32.0))
    proj = dm.backbone.model.layers[0].self_attn.q_proj
    x = torch.randn(3, H)
    torch.testing.assert_close(proj(x), x @ proj.weight.T + torch.arange(32.0))


def test_bitfit_targeting_the_head_needs_exclude_head_false() -> None:
    with pytest.raises(ValueError, match="exclude_head=False"):
        _attach("bert", "bitfit", targets=("head",))
    dm = _attach("bert", "bitfit", targets=("head",), exclude_head=False)
    assert dm.delta_parameters() == 3  # classifier bias, one per label


def test_bitfit_without_adding_biases_on_llama_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no bias parameters.*LlamaForSequenceClassification"):
        _attach("llama", "bitfit", add_bias=False)


def test_bitfit_layers_restricts_to_those_layers() -> None:
    dm = _attach("bert", "bitfit", layers="1")
    assert dm.delta_parameters() == 4 * H + H + F + H + H
    assert all("layer__1__" in k for k in _delta(dm).delta)


# -- LayerNorm ---------------------------------------------------------------------------------
LN_COUNTS = {  # number of norm layers x (weight + bias where present)
    "bert": (1 + 2 * L) * 2 * H,
    "distilbert": (1 + 2 * L) * 2 * H,
    "gpt2": (2 * L + 1) * 2 * H,
    "llama": (2 * L + 1) * H,  # RMSNorm: weight only
    "t5": ((2 * L + 1) + (3 * L + 1)) * H,  # T5LayerNorm: weight only; final norm per stack
    "bart": ((1 + 2 * L) + (1 + 3 * L)) * 2 * H,  # layernorm_embedding + per-layer norms
}


@pytest.mark.parametrize("arch", list(LN_COUNTS))
def test_layernorm_count_matches_closed_form(arch: str) -> None:
    model = make_model(arch)
    generic = sum(
        p.numel() for m in model.modules() if type(m).__name__.endswith("Norm") for p in m.parameters(recurse=False)
    )
    dm = dt.attach(model, dt.METHODS["layernorm"](), train_head=False)
    assert dm.delta_parameters() == dm.trainable_parameters() == LN_COUNTS[arch] == generic


def test_layernorm_on_a_layer_target_tunes_the_norms_inside_it() -> None:
    dm = _attach("bert", "layernorm", targets=("layer",), layers="1")
    assert dm.delta_parameters() == 2 * 2 * H
    assert all("LayerNorm" in k and "layer__1__" in k for k in _delta(dm).delta)


def test_layernorm_rejects_a_target_without_norm_layers() -> None:
    with pytest.raises(ValueError, match="no normalisation layer"):
        _attach("bert", "layernorm", targets=("attn.q",))


# -- Selective ---------------------------------------------------------------------------------
BERT_LAYER = 4 * (H * H + H) + 2 * H + (H * F + F) + (F * H + H) + 2 * H


def test_selective_default_tunes_every_parameter_of_the_last_layer() -> None:
    dm = _attach("bert", "selective")
    assert dm.delta_parameters() == BERT_LAYER == 8544
    assert all("layer__1__" in k for k in _delta(dm).delta)


def test_selective_last_k_counts_each_stack_of_t5_once_per_parameter() -> None:
    # T5's "layer" alias matches both block.1 and block.1.layer.i: nested, each parameter once
    encoder = 4 * H * H + H + 2 * H * F + H
    decoder = 8 * H * H + 2 * H + 2 * H * F + H
    assert _attach("t5", "selective").delta_parameters() == encoder + decoder == 20640
    assert _attach("t5", "selective", last_k=2).delta_parameters() > 2 * (encoder + decoder)  # + relative bias


def test_selective_last_k_takes_the_last_layers_of_stacks_of_unequal_depth() -> None:
    config = tf.BartConfig(
        vocab_size=100,
        d_model=H,
        encoder_layers=3,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=F,
        decoder_ffn_dim=F,
        max_position_embeddings=64,
    )
    dm = dt.attach(tf.BartForConditionalGeneration(config).eval(), dt.METHODS["selective"](last_k=1))
    keys = list(_delta(dm).delta)
    assert any(k.startswith("model__encoder__layers__2__") for k in keys)
    assert any(k.startswith("model__decoder__layers__1__") for k in keys)
    assert not any("layers__0__" in k or "encoder__layers__1__" in k for k in keys)


def test_selective_nested_targets_do_not_double_count() -> None:
    assert _attach("bert", "selective", targets=("layer", "attn.q", "ln")).delta_parameters() == BERT_LAYER


def test_selective_param_names_filter_keeps_only_weights() -> None:
    dm = _attach("bert", "selective", param_names=("weight",))
    assert dm.delta_parameters() == 4 * H * H + H + H * F + F * H + H
    assert all(k.endswith("__weight") for k in _delta(dm).delta)


def test_selective_layers_overrides_last_k_and_none_means_all_layers() -> None:
    assert _attach("bert", "selective", layers="0-1").delta_parameters() == 2 * BERT_LAYER
    assert _attach("bert", "selective", last_k=None).delta_parameters() == 2 * BERT_LAYER


def test_selective_tied_embedding_is_claimed_once_and_stays_tied() -> None:
    model = make_model("gpt2", "lm")
    original = model.lm_head.weight.detach().clone()
    dm = dt.attach(model, dt.METHODS["selective"](targets=("embeddings.word",), last_k=None))
    assert dm.delta_parameters() == 100 * H
    _perturb(dm)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert not torch.allclose(model.lm_head.weight, original)
    dm.detach()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, original)


def test_selective_last_k_beyond_depth_is_a_clear_error() -> None:
    with pytest.raises(TargetError, match="last_k=3 but"):
        _attach("bert", "selective", last_k=3)
    with pytest.raises(ValueError, match="last_k must be a positive integer"):
        _attach("bert", "selective", last_k=0)


# -- shared: merging and claims ----------------------------------------------------------------
@pytest.mark.parametrize("method", SPEC)
@pytest.mark.parametrize("arch", MERGE_ARCHS)
def test_merge_matches_unmerged_output_and_unmerge_restores_weights(method: str, arch: str) -> None:
    model = make_model(arch)
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS[method]())
    _perturb(dm)
    before_weights = {k: v.clone() for k, v in state(model).items() if "parametrizations" in k}
    unmerged = logits(dm, inputs)
    dm.merge()
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)
    dm.unmerge()
    after = state(model)
    for k, v in before_weights.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(dm, inputs), unmerged, rtol=0, atol=1e-5)


def test_bitfit_merge_on_llama_materialises_and_removes_the_added_biases() -> None:
    model = make_model("llama")
    dm = dt.attach(model, dt.METHODS["bitfit"]())
    _perturb(dm)
    dm.merge()
    assert model.model.layers[0].mlp.down_proj.bias is not None
    dm.unmerge()
    assert model.model.layers[0].mlp.down_proj.bias is None
    base = state(make_model("llama"))
    assert same_state(base, state(dm.detach()))


def test_two_deltas_claiming_one_parameter_raise_and_leave_the_model_clean() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    base, out = state(model), logits(model, inputs)
    dm = dt.attach(model, dt.METHODS["bitfit"](), "bias")
    with pytest.raises(
        DeltaError, match=r"selective cannot claim bert\.encoder\.layer\.1\..*narrow one of their targets"
    ):
        dm.add("last", dt.METHODS["selective"]())
    assert list(dm.deltas) == ["bias"]
    torch.testing.assert_close(logits(dm, inputs), out, rtol=0, atol=1e-6)
    dm.detach()
    assert same_state(base, state(model))


def test_deltas_on_disjoint_parameters_coexist() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["selective"](param_names=("weight",)), "w", train_head=False)
    dm.add("ln", dt.METHODS["layernorm"](layers="0"))
    assert dm.delta_parameters() == dm.trainable_parameters() == dm.delta_parameters("w") + 2 * 2 * H


@pytest.mark.parametrize("method", SPEC)
@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_sites_add_up_to_the_delta_parameter_count(method: str, arch: str) -> None:
    dm = _attach(arch, method, "lm")
    sites = _delta(dm).sites
    assert sum(sites.values()) == dm.delta_parameters()
    assert all(name in dict(dm.backbone.named_modules()) for name in sites)


# -- diff pruning ------------------------------------------------------------------------------
def test_diff_pruning_counts_diff_and_log_alpha_per_chosen_weight() -> None:
    per_layer = 4 * (H * H + H) + (H * F + F) + (F * H + H)
    assert _attach("bert", "diff_pruning").delta_parameters() == 2 * L * per_layer
    assert _attach("bert", "diff_pruning", mode="magnitude").delta_parameters() == L * per_layer


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_diff_pruning_magnitude_prune_reaches_target_sparsity(arch: str) -> None:
    dm = _attach(arch, "diff_pruning", mode="magnitude", sparsity=0.9)
    _perturb(dm)
    delta = _delta(dm)
    delta.prune()
    total = sum(p.numel() for p in delta.delta.values())
    assert abs(delta.sparsity() - 0.9) <= 1 / total


def test_diff_pruning_pruned_entries_stay_zero_after_more_steps() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["diff_pruning"](mode="magnitude", sparsity=0.8))
    delta = _delta(dm)
    opt = torch.optim.Adam([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # momentum built before pruning must not revive pruned entries
        opt.zero_grad()
        loss(dm, inputs).backward()
        opt.step()
    delta.prune()
    pruned = {k: getattr(delta.masks, k).logical_not().clone() for k in delta.delta}
    for _ in range(3):
        opt.zero_grad()
        loss(dm, inputs).backward()
        opt.step()
    saved = delta.state_dict()
    for k, off in pruned.items():
        assert torch.all(delta.effective(k)[off] == 0)
        assert torch.all(saved[f"delta.{k}"][off] == 0)
    assert delta.sparsity() >= 0.8 - 1e-6


@pytest.mark.parametrize("hard_concrete", [{}, {"temperature": 2 / 3, "stretch": (-0.1, 1.1)}], ids=["guo", "louizos"])
def test_diff_pruning_l0_penalty_decreases_with_log_alpha(hard_concrete: dict) -> None:
    delta = _delta(_attach("bert", "diff_pruning", **hard_concrete))
    high = delta.l0_penalty().item()
    with torch.no_grad():
        for a in delta.log_alpha.values():
            a.sub_(3.0)
    assert delta.l0_penalty().item() < high
    penalty = delta.l0_penalty()
    penalty.backward()
    assert all(a.grad is not None and torch.all(a.grad > 0) for a in delta.log_alpha.values())


def test_diff_pruning_eval_output_is_deterministic_and_train_gates_are_sampled() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["diff_pruning"]())
    delta = _delta(dm)
    _perturb(dm, scale=0.2)  # log_alpha near 0: gates neither surely open nor closed
    assert torch.equal(logits(dm, inputs), logits(dm, inputs))
    delta.train()  # only the delta: the backbone's dropout stays off
    torch.manual_seed(0)
    assert not torch.equal(logits(dm, inputs), logits(dm, inputs))


def test_diff_pruning_is_identity_at_init_with_sampled_gates() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    out = logits(model, inputs)
    dm = dt.attach(model, dt.METHODS["diff_pruning"]())
    _delta(dm).train()
    torch.testing.assert_close(logits(dm, inputs), out, rtol=0, atol=1e-6)


def test_diff_pruning_l0_sparsity_counts_closed_gates() -> None:
    delta = _delta(_attach("bert", "diff_pruning"))
    assert delta.sparsity() == 0.0
    first = next(iter(delta.log_alpha))
    with torch.no_grad():
        delta.log_alpha[first].fill_(-10.0)
    total = sum(a.numel() for a in delta.log_alpha.values())
    assert delta.sparsity() == pytest.approx(delta.log_alpha[first].numel() / total)


def test_diff_pruning_l0_prune_folds_gates_and_drops_log_alpha() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["diff_pruning"](sparsity=0.0))
    _perturb(dm, scale=0.5)
    out = logits(dm, inputs)
    delta = _delta(dm)
    delta.prune()
    assert delta.config.mode == "l0" and delta.finalized == {"mode": "magnitude"} and len(delta.log_alpha) == 0
    assert all(k.startswith("delta.") for k in delta.state_dict())
    assert delta.l0_penalty().item() == 0.0
    assert sum(delta.sites.values()) == dm.delta_parameters()
    torch.testing.assert_close(logits(dm, inputs), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, "sparsity .* must be in \\[0, 1\\)"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"mode": "topk"}, "mode must be one of l0, magnitude"),
        ({"stretch": (0.0, 1.0)}, "stretch"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_diff_pruning_bad_config_is_a_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _attach("bert", "diff_pruning", **kwargs)


@pytest.mark.parametrize("method", SPEC)
def test_target_matching_nothing_lists_close_names(method: str) -> None:
    with pytest.raises(TargetError, match="matches no module.*closest names: .*query"):
        _attach("bert", method, targets=("querry",))
