"""The core without any method's math: targeting, several named deltas, freezing, tree, errors."""

from __future__ import annotations

import pytest
import torch
from tiny import CASES, logits, make_inputs, make_model, same_state, state

import deltatune as dt
from deltatune.core.targeting import TargetError, layer_index, parse_layers, resolve

# alias -> (architecture, head) -> (number of modules, first module's name)
EXPECTED = {
    ("bert", "attn.q"): (2, "bert.encoder.layer.0.attention.self.query"),
    ("bert", "ffn.out"): (2, "bert.encoder.layer.0.output.dense"),
    ("bert", "ln"): (5, "bert.embeddings.LayerNorm"),
    ("bert", "layer"): (2, "bert.encoder.layer.0"),
    ("roberta", "attn.o"): (2, "roberta.encoder.layer.0.attention.output.dense"),
    ("distilbert", "attn.k"): (2, "distilbert.transformer.layer.0.attention.k_lin"),
    ("distilbert", "ffn.in"): (2, "distilbert.transformer.layer.0.ffn.lin1"),
    ("gpt2", "attn.q"): (2, "transformer.h.0.attn.c_attn"),
    ("gpt2", "ffn.out"): (2, "transformer.h.0.mlp.c_proj"),
    ("llama", "ffn.in"): (4, "model.layers.0.mlp.gate_proj"),
    ("llama", "ln"): (5, "model.layers.0.input_layernorm"),
    ("t5", "attn.q"): (4, "transformer.encoder.block.0.layer.0.SelfAttention.q"),
    ("t5", "xattn.k"): (2, "transformer.decoder.block.0.layer.1.EncDecAttention.k"),
    ("t5", "layer"): (4, "transformer.encoder.block.0"),
    ("t5", "ln"): (12, "transformer.encoder.block.0.layer.0.layer_norm"),
    ("bart", "attn.o"): (4, "model.encoder.layers.0.self_attn.out_proj"),
    ("bart", "xattn.v"): (2, "model.decoder.layers.0.encoder_attn.v_proj"),
    ("bart", "ffn.in"): (4, "model.encoder.layers.0.fc1"),
}


@pytest.mark.parametrize("arch,alias", list(EXPECTED), ids=lambda x: str(x))
def test_alias_resolves_to_the_architectures_modules(arch: str, alias: str) -> None:
    names = resolve(make_model(arch), alias)
    count, first = EXPECTED[(arch, alias)]
    assert (len(names), names[0]) == (count, first)


@pytest.mark.parametrize("arch,head", CASES, ids=lambda x: str(x))
def test_head_alias_finds_the_task_head(arch: str, head: str) -> None:
    model = make_model(arch, head)
    names = resolve(model, "head")
    expected = {"cls": ("classifier", "score", "classification_head"), "lm": ("lm_head",)}[head]
    assert any(n.split(".")[0] in expected for n in names)
    assert not any(n.startswith(model.base_model_prefix + ".") for n in names)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_side_prefix_restricts_to_encoder_or_decoder(arch: str) -> None:
    model = make_model(arch, "lm")
    enc, dec = resolve(model, "encoder:attn.q"), resolve(model, "decoder:attn.q")
    assert len(enc) == len(dec) == 2
    assert all(".encoder." in f".{n}" for n in enc) and all(".decoder." in f".{n}" for n in dec)


def test_exact_name_suffix_and_regex_targets() -> None:
    model = make_model("bert")
    assert resolve(model, "bert.encoder.layer.1.attention.self.query") == ["bert.encoder.layer.1.attention.self.query"]
    assert len(resolve(model, "query")) == 2
    assert resolve(model, r"re:.*layer\.1\.attention\.self\.(query|key)") == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
    ]


@pytest.mark.parametrize(
    "spec,expected", [("1", {1}), ("0-1", {0, 1}), ("1:", {1}), (-1, {1}), ([0], {0}), ("0,1", {0, 1})]
)
def test_layer_selection_forms(spec: object, expected: set[int]) -> None:
    assert parse_layers(spec, 2) == expected
    names = resolve(make_model("bert"), "attn.q", layers=spec)
    assert {layer_index(n) for n in names} == expected


def test_layer_selection_on_the_real_twelve_layer_form() -> None:
    assert parse_layers("6-11", 12) == set(range(6, 12))
    assert parse_layers("9:", 12) == {9, 10, 11}


@pytest.mark.parametrize(
    "target,fragment",
    [("querry", "closest names: query"), ("attn.qq", "attn.q"), ("ffn.output", "ffn.out")],
)
def test_unknown_target_error_lists_close_names(target: str, fragment: str) -> None:
    with pytest.raises(TargetError, match="matches no module") as err:
        resolve(make_model("bert"), target)
    assert fragment in str(err.value)


def test_bad_targets_and_layers_raise_clear_errors() -> None:
    model = make_model("bert")
    with pytest.raises(TargetError, match="invalid regex"):
        resolve(model, "re:(")
    with pytest.raises(TargetError, match="empty target list"):
        resolve(model, [])
    with pytest.raises(TargetError, match=r"layer 5 does not exist: the model has layers 0-1"):
        resolve(model, "attn.q", layers=5)
    with pytest.raises(TargetError, match=r"layer -3 does not exist: .*\(-2..-1 from the end\)"):
        resolve(model, "attn.q", layers=-3)  # named as written (was: 'layers [-1]', the index it became)
    with pytest.raises(TargetError, match="cannot read layer selection"):
        resolve(model, "attn.q", layers="first")
    with pytest.raises(TargetError, match="unknown side"):
        resolve(model, "middle:attn.q")
    with pytest.raises(TargetError, match=r"'llama' has no 'xattn.q' \(its aliases: attn.q, attn.k, "):
        resolve(make_model("llama"), "xattn.q")


def test_attach_with_a_typo_fails_before_touching_the_model() -> None:
    model = make_model("bert")
    base = state(model)
    with pytest.raises(TargetError, match="closest names"):
        dt.attach(model, dt.METHODS["lora"](targets=["query", "vaule"]))
    assert same_state(base, state(model))
    assert all(not hasattr(m, "parametrizations") for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def _perturbed_lora(**kwargs: object) -> dt.DeltaConfig:
    return dt.METHODS["lora"](**kwargs)


def _randomize(dm: dt.DeltaModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta(name).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_several_named_deltas_enable_disable_and_set_active() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    base = logits(model, inputs)
    dm = dt.attach(model, _perturbed_lora(), name="a", train_head=False)
    dm.add("b", _perturbed_lora(targets=("attn.k",)))
    _randomize(dm, "a", 0)
    _randomize(dm, "b", 1)
    both = logits(dm, inputs)
    dm.set_active("a")
    only_a = logits(dm, inputs)
    dm.set_active(["b"])
    only_b = logits(dm, inputs)
    dm.disable("b")
    torch.testing.assert_close(logits(dm, inputs), base, rtol=0, atol=0)
    assert not torch.allclose(only_a, only_b) and not torch.allclose(both, only_a)
    dm.enable("a")
    dm.enable("b")
    torch.testing.assert_close(logits(dm, inputs), both, rtol=0, atol=0)
    assert dm.trainable_parameters() == dm.delta_parameters("a") + dm.delta_parameters("b")


def test_enable_and_disable_default_to_the_default_delta_like_merge_and_save() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    base = logits(model, inputs)
    dm = dt.attach(model, _perturbed_lora(), train_head=False)
    _randomize(dm, "default", 0)
    on = logits(dm, inputs)
    dm.disable()
    torch.testing.assert_close(logits(dm, inputs), base, rtol=0, atol=0)
    dm.enable()
    torch.testing.assert_close(logits(dm, inputs), on, rtol=0, atol=0)
    other = dt.attach(make_model("bert"), _perturbed_lora(), name="a")
    with pytest.raises(KeyError, match="no delta named 'default'; attached deltas: a"):
        other.disable()


def test_detaching_one_of_two_keeps_the_other() -> None:
    model = make_model("gpt2", "lm")
    inputs = make_inputs(model)
    dm = dt.attach(model, _perturbed_lora(), name="a")
    dm.add("b", dt.METHODS["lora"](targets=("ffn.in",)))
    _randomize(dm, "a", 0)
    _randomize(dm, "b", 1)
    dm.set_active("a")
    only_a = logits(dm, inputs)
    dm.enable("b")
    assert dm.detach("b") is dm
    torch.testing.assert_close(logits(dm, inputs), only_a, rtol=0, atol=0)
    assert list(dm.deltas) == ["a"]


def test_delta_names_and_duplicates_are_checked() -> None:
    dm = dt.attach(make_model("bert"), _perturbed_lora())
    with pytest.raises(ValueError, match="already attached"):
        dm.add("default", _perturbed_lora())
    with pytest.raises(ValueError, match="without dots"):
        dm.add("a.b", _perturbed_lora())
    with pytest.raises(KeyError, match="attached deltas: default"):
        dm.detach("missing")
    with pytest.raises(TypeError, match="already carries deltas"):
        dt.DeltaModel(dm)
    with pytest.raises(TypeError, match=r"get_config\(method"):
        dm.add("x", {"r": 8})


def test_unknown_method_name_suggests_the_closest() -> None:
    with pytest.raises(KeyError, match="did you mean lora"):
        dt.get_config("lorra")


@pytest.mark.parametrize(
    "method,kwargs,fragment",
    [("lora", {"r": 0}, "r must be a positive integer"), ("lora", {"dropout": 1.5}, r"dropout must be in \[0, 1\)")],
)
def test_bad_config_values_raise_before_attaching(method: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        dt.attach(make_model("bert"), dt.METHODS[method](**kwargs))


def test_train_head_unfreezes_only_the_head() -> None:
    model = make_model("bert")
    dm = dt.attach(model, _perturbed_lora(), train_head=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    assert dm.trainable_parameters() == dm.delta_parameters() + head
    sd = dm.delta_state_dict(include_head=True)
    assert {"__head__.classifier.weight", "__head__.classifier.bias"} <= set(sd)


def test_forward_and_attributes_pass_through_to_the_backbone() -> None:
    model = make_model("bert")
    dm = dt.attach(model, _perturbed_lora())
    assert dm.config is model.config
    assert dm.get_input_embeddings() is model.get_input_embeddings()
    inputs = make_inputs(model)
    assert torch.equal(dm(**inputs).logits, dm.forward(**inputs).logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bart"])
def test_generate_runs_through_the_delta(arch: str) -> None:
    model = make_model(arch, "lm")
    inputs = make_inputs(model, batch=1)
    kwargs = {"input_ids": inputs["input_ids"], "max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    plain = model.generate(**kwargs)
    dm = dt.attach(model, _perturbed_lora())
    assert torch.equal(dm.generate(**kwargs), plain)  # LoRA starts as the identity
    _randomize(dm, "default", 3)
    changed = dm.generate(**kwargs)
    dm.disable("default")
    assert torch.equal(dm.generate(**kwargs), plain)
    assert changed.shape == plain.shape and not torch.equal(changed, plain)


def test_tree_marks_each_site_with_its_parameter_count() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"](r=2))
    text = dm.tree()
    assert "query (Linear, 1,056 params)  <- lora:default +128" in text
    assert "1-1: same as 0" in text
    assert "delta 'default' (lora): 512 parameters" in text
