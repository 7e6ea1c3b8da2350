"""PEFT's config objects given to attach: the delta computes what PEFT's model computes with the same config.

Each case builds PEFT's model with the config, makes its delta non-zero (seeded), copies the tensors into the
delta deltatune built from the same config object, module by module (a module only one side has fails), and
compares the outputs. That checks which modules were chosen, the ranks, the scaling (alpha, rsLoRA, patterns)
and the side (IA)^3 rescales."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.delta import safe_key

peft = pytest.importorskip("peft")

LORA_CASES = {
    "bert-named": ("bert", "cls", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert-peft-default-targets": ("bert", "cls", dict(r=4)),
    "bert-all-linear-rslora-patterns": (
        "bert",
        "cls",
        dict(
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules="all-linear",
            task_type="SEQ_CLS",
            rank_pattern={"value": 2},
            alpha_pattern={"query": 3.0},
        ),
    ),  # fmt: skip
    "bert-exclude-layers": (
        "bert",
        "cls",
        dict(r=2, target_modules=["query", "key", "dense"], exclude_modules=["output.dense"], layers_to_transform=[1]),
    ),
    "bert-regex-exclude": (
        "bert",
        "cls",
        dict(r=2, target_modules=r".*\.(query|key|dense)", exclude_modules=r"bert\.pooler\..*"),
    ),
    "bert-dora": ("bert", "cls", dict(r=4, use_dora=True, target_modules=["query", "value"])),
    "gpt2-conv1d": ("gpt2", "lm", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama-all-linear": ("llama", "lm", dict(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")),
}


def _peft_model(model: torch.nn.Module, config: object) -> torch.nn.Module:
    pm = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(k in name for k in ("lora_B", "ia3_l", "lora_magnitude")):
                p.copy_(p + torch.randn(p.shape, generator=g))
    return pm.eval()


def _modules(pm: torch.nn.Module, mark: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module name in the base model: {tensor kind: tensor}} of PEFT's injected layers."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in pm.named_parameters():
        m = re.fullmatch(rf"base_model\.model\.(.+)\.({mark})\.default(?:\.weight)?", name)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = p.detach()
    return out


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_a_peft_lora_config_attaches_the_delta_peft_builds(case: str) -> None:
    arch, head, settings = LORA_CASES[case]
    model = make_model(arch, head)
    inputs = make_inputs(model)
    config = peft.LoraConfig(**settings)
    pm = _peft_model(model, config)
    base = logits(model, inputs)
    dm = dt.attach(model, config, train_head=False)
    delta = dm.delta("default")
    peft_layers = _modules(pm, "lora_A|lora_B|lora_magnitude_vector")
    assert sorted(delta.layers) == sorted(safe_key(m) for m in peft_layers), "deltatune chose other modules than PEFT"
    with torch.no_grad():
        for module, parts in peft_layers.items():
            layer = delta.layers[safe_key(module)]
            lora = layer.lora if settings.get("use_dora") else layer
            lora.A.copy_(parts["lora_A"])  # shapes must agree: the ranks are PEFT's
            lora.B.copy_(parts["lora_B"])
            if "lora_magnitude_vector" in parts:
                layer.magnitude.copy_(parts["lora_magnitude_vector"])
    expected = logits(pm, inputs)
    assert (expected - base).abs().max() > 1e-4, "PEFT's delta changes nothing: the comparison would prove nothing"
    torch.testing.assert_close(logits(dm, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "settings", [{}, {"target_modules": ["query", "value", "output.dense"], "feedforward_modules": ["output.dense"]}]
)
def test_a_peft_ia3_config_rescales_the_sides_peft_rescales(settings: dict) -> None:
    model = make_model("bert", "cls")
    inputs = make_inputs(model)
    config = peft.IA3Config(**settings)
    pm = _peft_model(model, config)
    dm = dt.attach(model, config, train_head=False)
    delta = dm.delta("default")
    vectors = _modules(pm, "ia3_l")
    assert sorted(delta.vectors) == sorted(safe_key(m) for m in vectors)
    with torch.no_grad():
        for module, parts in vectors.items():
            delta.vectors[safe_key(module)].copy_(parts["ia3_l"].reshape(-1))
    torch.testing.assert_close(logits(dm, inputs), logits(pm, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: peft.LoraConfig(r=4, init_lora_weights="pissa"), r"LoraConfig.init_lora_weights='pissa' has no"),
        (lambda: peft.LoraConfig(r=4, bias="all"), r"LoraConfig.bias='all' has no deltatune equivalent"),
        (lambda: peft.LoraConfig(r=4, layers_to_transform=[0], layers_pattern="layer"), "layers_pattern is not read"),
        (lambda: peft.LoraConfig(r=4, modules_to_save=["pooler"]), r"modules_to_save=\['pooler'\]: deltatune trains"),
        (lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"), r"get_config\('prompt'"),
    ],
)
def test_what_a_peft_config_says_that_attach_cannot_do_is_refused_by_field(make, match: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        dt.attach(make_model("bert", "cls"), make())


def test_modules_to_save_naming_an_lm_head_asks_for_train_head() -> None:
    """PEFT trains a module it saves; deltatune's "auto" leaves LM heads frozen, so reading the config as given
    would train less than PEFT, silently."""
    with pytest.raises(ValueError, match="pass train_head=True"):
        dt.attach(
            make_model("gpt2", "lm"), peft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"])
        )


def test_all_linear_is_every_linear_layer_outside_the_head() -> None:
    model = make_model("bert", "cls")
    chosen = dt.resolve(model, "all-linear")
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert chosen == [n for n in linear if not n.startswith("classifier")] and "bert.pooler.dense" in chosen


def test_a_config_without_targets_on_a_type_peft_has_no_default_for_names_this_models_own_modules() -> None:
    """PEFT refuses a LoraConfig without target_modules for ESM ("Please specify `target_modules`"), and so do
    we; the line suggested ['q_proj', 'v_proj'], which ESM does not have. It names ESM's own query and value."""
    import transformers as tf

    config = tf.EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, mask_token_id=1, pad_token_id=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"no default for model type 'esm'; .* target_modules=\['query', 'value'\]"):
        dt.attach(tf.EsmForMaskedLM(config), peft.LoraConfig(r=2))


def test_peft_s_all_linear_on_fused_experts_is_refused_naming_them() -> None:
    """PEFT's "all-linear" on a mixture-of-experts model with fused 3-D expert weights (transformers 5's Qwen3-MoE)
    also adapts the experts and their routers; deltatune attached the attention alone, without a word."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(config)
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers release keeps the experts as linear layers")
    with pytest.raises(
        ValueError, match=r"'all-linear' on this mixture-of-experts model: PEFT also adapts the experts"
    ):
        dt.attach(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    dt.attach(model, "lora", targets="all-linear")  # deltatune's own: the linear layers, as documented
