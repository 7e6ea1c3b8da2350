"""Careless use of the Python API: each misuse either works correctly or is refused in one line, state unchanged."""

from __future__ import annotations

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.delta import DeltaError


def _perturbed(dm: dt.DeltaModel) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for delta in dm.deltas.values():
            for p in delta.parameters():
                if p.is_floating_point():
                    p.add_(torch.randn_like(p) * 0.5)


def test_deltas_on_other_modules_unmerge_in_any_order() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.get_config("oft", targets=("attn.v",)), "a")
    dm.add("b", dt.get_config("ia3", targets=("attn.q",), feedforward=()))
    _perturbed(dm)
    dm.eval()
    ref = logits(dm, inputs)
    dm.merge("a")
    dm.merge("b")
    dm.unmerge("a")
    dm.unmerge("b")
    assert torch.allclose(logits(dm, inputs), ref, atol=1e-6)


def test_merging_a_disabled_delta_is_refused_and_changes_nothing() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, "lora")
    _perturbed(dm)
    dm.eval()
    dm.disable("default")
    off = logits(dm, inputs)
    with pytest.raises(
        DeltaError, match=r"delta 'default' is disabled; enable it before merging \(dm.enable\('default'\)\)"
    ):
        dm.merge("default")
    assert not dm.deltas["default"].merged
    assert torch.equal(logits(dm, inputs), off)  # still acts as off
    dm.enable("default")
    dm.merge("default")


@pytest.mark.parametrize(
    "first,second",
    [("lora", "random_subset"), ("random_subset", "lora"), ("diff_pruning", "lokr"), ("said", "vera"),
     ("selective", "loha"), ("lora", "loha"), ("bitfit", "adalora")],
)  # fmt: skip
def test_deltas_that_add_to_the_same_weights_merge_exactly_in_any_order(first: str, second: str) -> None:
    """A LoRA-like merge beside a specification delta (which reparametrizes the weight as W + d) wrote into
    the parametrization's computed tensor, a temporary: the merge was lost without a word (logits 2e-3 off
    with LoRA + random-subset). Deltas that add to the weights now merge in any order, one or both."""
    model = make_model("bert").eval()
    inputs = make_inputs(model)
    dm = dt.attach(model, first)
    dm.add("b", second)
    _perturbed(dm)
    dm.eval()
    expected = logits(dm, inputs)
    for order in (["default"], ["b"], ["default", "b"], ["b", "default"]):
        for name in order:
            dm.merge(name)
        torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)
        for name in order:  # unmerged in the order they were merged: additions commute
            dm.unmerge(name)
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("odd", ["oft", "dora", "ia3"])
def test_a_merge_that_does_not_commute_with_another_delta_on_its_modules_is_refused(odd: str) -> None:
    """OFT, DoRA or (IA)^3 with LoRA on the same modules: merging either gave outputs 3e-4 to 3e-3 off the
    unmerged ones (logits ~1e-1), and so did switching one on beside the other merged; refused now."""
    model = make_model("bert").eval()
    odd_config = dt.get_config(odd, targets=("attn.v",), **({"feedforward": ()} if odd == "ia3" else {}))
    dm = dt.attach(model, dt.get_config("lora", targets=("attn.v",)))
    dm.add("b", odd_config)
    for name in ("default", "b"):
        with pytest.raises(DeltaError, match="does not commute with another delta there"):
            dm.merge(name)
    assert not dm._merged()
    dm.disable("b")
    dm.merge("default")  # alone on its modules: fine
    with pytest.raises(DeltaError, match="cannot enable 'b'"):
        dm.enable("b")
    with pytest.raises(DeltaError, match="cannot enable 'b'"):
        dm.set_active(["default", "b"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(DeltaError, match="cannot add 'c'"):
        dm.add("c", odd_config)
    assert "c" not in dm.deltas and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    dm.unmerge("default")
    dm.enable("b")


def test_an_ia3_feedforward_module_outside_the_targets_is_refused_not_ignored() -> None:
    """`get_config("ia3", feedforward=("attn.q",))` was accepted and scaled nothing's input (attn.q is not a
    target): the setting did nothing, without a word. PEFT refuses it; so does deltatune now."""
    model = make_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="feedforward names .*query.* not among the targets"):
        dt.attach(model, dt.get_config("ia3", feedforward=("attn.q",)))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    dt.attach(make_model("bert"), dt.get_config("ia3", targets=("attn.q",)))  # the default feedforward: unused
    dm = dt.attach(make_model("bert"), dt.get_config("ia3", targets=("attn.q", "ffn.out"), feedforward=("ffn.out",)))
    assert dm.delta_parameters() > 0


@pytest.mark.parametrize("method", ["prompt", "said", "vera", "random_subset"])
def test_every_method_seed_is_a_non_negative_integer(method: str) -> None:
    """Prompt and SAID took seed=-1 while VeRA and random-subset refused it: one rule for every seed."""
    for wrong in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"\.seed must be an integer >= 0, got {wrong}"):
            dt.get_config(method, seed=wrong).validate()
    dt.get_config(method, seed=0).validate()


def test_attach_takes_a_method_name_with_its_settings_or_a_saved_config_mapping() -> None:
    """`attach(model, "lora", r=16)` was a TypeError (unexpected keyword), 'LoRA' an unknown method."""
    dm = dt.attach(make_model("bert"), "LoRA", r=16, targets=("attn.q",))
    assert dm.delta().config == dt.get_config("lora", r=16, targets=("attn.q",))
    assert dt.get_config("Diff-Pruning").method == "diff_pruning" and dt.get_config(" IA3 ").method == "ia3"
    mapping = dt.attach(make_model("bert"), {"method": "lora", "r": 4})  # as delta.json keeps a config
    assert mapping.delta().config == dt.get_config("lora", r=4)
    with pytest.raises(TypeError, match=r"settings \(r\) go with a method name.*LoRAConfig\(r=\.\.\.\)"):
        dt.attach(make_model("bert"), dt.LoRAConfig(), r=16)
    with pytest.raises(ValueError, match="LoRAConfig has no setting 'lora_alpha'; deltatune calls it 'alpha'"):
        dt.attach(make_model("bert"), "lora", lora_alpha=16)


@pytest.mark.parametrize(
    "config, match",
    [
        (dt.LoRAConfig, r"got the class LoRAConfig; pass an instance, LoRAConfig\(\)"),
        (["lora", "bitfit"], r"one delta per call: to combine methods, attach one and add the others"),
        (None, r"expected a method config such as deltatune.get_config"),
    ],
)
def test_what_is_not_a_config_is_named_with_the_fix_and_leaves_the_model_untouched(config: object, match: str) -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    before = logits(model, inputs)
    with pytest.raises(TypeError, match=match):
        dt.attach(model, config)
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)
    dt.attach(model, "lora")  # nothing was left attached


def test_an_integer_state_is_refused_for_float_delta_tensors_before_anything_is_copied() -> None:
    """load_delta_state_dict cast an int64 state into the float LoRA factors without a word."""
    dm = dt.attach(make_model("bert"), "lora")
    before = {k: v.clone() for k, v in dm.delta_state_dict().items()}
    ints = {k: torch.ones_like(v, dtype=torch.int64) for k, v in before.items()}
    with pytest.raises(DeltaError, match=r"is torch.int64, where the delta holds torch.float32"):
        dm.load_delta_state_dict("default", ints)
    assert all(torch.equal(v, dm.delta_state_dict()[k]) for k, v in before.items())
    dm.load_delta_state_dict("default", {k: v.double() for k, v in before.items()})  # another float width: fine


@pytest.mark.parametrize("fused", [False, True])
def test_an_optimizer_without_the_deltas_is_warned_even_when_zero_grad_clears_them(fused: bool) -> None:
    """`dm.zero_grad()` at every step (what Trainer(model=dm) does) cleared the evidence: an optimizer over the
    head alone trained no delta for 150 steps, no warning (CrossEncoderTrainer with a loss built on the
    CrossEncoder). An optimizer over every parameter does not warn, fused AdamW included, whose steps leave
    the tensors' `_version` as it was."""
    import warnings

    from deltatune.core.unstepped import UNSTEPPED_FORWARDS

    model = make_model("bert").train()
    dm = dt.attach(model, "lora", train_head=True)
    inputs = make_inputs(model)
    head = [p for n, p in model.named_parameters() if n in set(dm.head_parameter_names())]

    def run(params: list[torch.nn.Parameter]) -> None:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=fused)
        for _ in range(UNSTEPPED_FORWARDS + 50):
            dm(**inputs).loss.backward()
            opt.step()
            dm.zero_grad(set_to_none=True)

    lora = {k: v.clone() for k, v in dm.delta_state_dict("default").items()}
    with pytest.warns(UserWarning, match="no optimizer step changed it"):
        run(head)
    assert all(torch.equal(v, lora[k]) for k, v in dm.delta_state_dict("default").items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run([p for p in dm.parameters() if p.requires_grad])


def test_a_head_frozen_after_attaching_is_warned_at_the_first_training_forward() -> None:
    """`peft.prepare_model_for_kbit_training(dm.backbone)` after attaching (PEFT's QLoRA recipe, one line late)
    sets every backbone parameter to need no gradient: the deltas train on, but the head set to train stays as it
    was loaded, without a word."""
    import warnings

    model = make_model("bert")
    dm = dt.attach(model, "lora", train_head=True)
    for p in dm.backbone.parameters():  # what prepare_model_for_kbit_training does
        p.requires_grad_(False)
    dm.train()
    with pytest.warns(UserWarning, match=r"trains the task head .* none of the head's parameters \(classifier\)"):
        dm(**make_inputs(model))
    dm.freeze(train_head=True)  # the fix it names
    fresh = dt.attach(make_model("bert"), "lora", train_head=True).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm(**make_inputs(model))
        fresh(**make_inputs(model))


def test_training_the_shared_head_beside_a_disabled_delta_is_warned() -> None:
    """Rows of every delta share the task head: training it with another delta loaded but off (two rerankers on
    one CrossEncoder) moved the other delta's scores, without a word."""
    import warnings

    model = make_model("bert")
    dm = dt.attach(model, "lora", name="a", train_head=True)
    dm.add("b", dt.get_config("bitfit"), enabled=False)
    dm.train()
    with pytest.warns(
        UserWarning, match=r"the task head \(classifier\) trains, and every delta's rows share it: .*\['b'\]"
    ):
        dm(**make_inputs(model))
    quiet = dt.attach(make_model("bert"), "lora", name="a", train_head=False)
    quiet.add("b", dt.get_config("bitfit"), enabled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.train()(**make_inputs(model))
