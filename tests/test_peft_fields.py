"""Every adapter_config.json field of every PEFT type deltatune imports is honored, leaves a trained
adapter's outputs unchanged, or is refused by name; a field it does not know that is set is refused
(a later PEFT's option may change the outputs) unless `ignore_fields` names it.

PEFT itself is the oracle: each option is set on a tiny model, the adapter made non-trivial and saved,
and the import must give PEFT's outputs to 1e-5 or refuse in one line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from tiny import logits, make_config, make_inputs, make_model

import deltatune as dt
from deltatune.interop import CONFIG_FIELDS, PeftFormatError, export_peft, import_peft
from deltatune.interop.peft_common import COMMON_FIELDS

peft = pytest.importorskip("peft")

TASK = {"cls": "SEQ_CLS", "lm": "CAUSAL_LM"}
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}
CONFIG = {
    "LORA": "LoraConfig", "LOHA": "LoHaConfig", "LOKR": "LoKrConfig", "OFT": "OFTConfig", "VERA": "VeraConfig",
    "ADALORA": "AdaLoraConfig", "IA3": "IA3Config", "LN_TUNING": "LNTuningConfig",
    "PROMPT_TUNING": "PromptTuningConfig", "PREFIX_TUNING": "PrefixTuningConfig",
}  # fmt: skip
# the smallest adapter of each type, for the field tests: (arch, settings)
BASIC = {
    "LORA": ("bert", {"r": 4}),
    "LOHA": ("bert", {"r": 4}),
    "LOKR": ("bert", {"r": 2}),
    "OFT": ("bert", {"r": 0, "oft_block_size": 8}),
    "VERA": ("bert", {"r": 16}),
    "ADALORA": ("bert", {"init_r": 6, "target_r": 2, "total_step": 10}),
    "IA3": ("bert", {"target_modules": ["key", "output.dense"], "feedforward_modules": ["output.dense"]}),
    "LN_TUNING": ("bert", {"target_modules": ["LayerNorm"]}),
    "PROMPT_TUNING": ("bert", {"num_virtual_tokens": 3}),
    "PREFIX_TUNING": ("llama", {"num_virtual_tokens": 3}),
}


def _save(config_cls: str, arch: str, folder: Path, **kwargs: object) -> tuple[torch.Tensor, dict]:
    """A PEFT adapter with non-trivial weights, saved to `folder`; returns its logits and the inputs."""
    head = "cls" if arch == "bert" else "lm"
    cls = getattr(peft, config_cls)
    if "target_modules" in cls.__dataclass_fields__ and "target_modules" not in kwargs:
        kwargs["target_modules"] = TARGETS[arch]
    pm = peft.get_peft_model(make_model(arch, head), cls(task_type=TASK[head], **kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and "modules_to_save" not in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval().save_pretrained(folder)
    inputs = make_inputs(make_model(arch, head))
    return logits(pm, inputs), inputs


def _assert_peft_s_outputs(dm, expected: torch.Tensor, inputs: dict, arch: str) -> None:  # noqa: ANN001
    got = logits(dm, inputs)
    expected = expected[:, -got.shape[1] :] if expected.dim() == 3 else expected  # PEFT's prompt positions too
    base = logits(make_model(arch, "cls" if arch == "bert" else "lm"), inputs)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _model(arch: str) -> torch.nn.Module:
    return make_model(arch, "cls" if arch == "bert" else "lm")


# -- the rule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_type", list(CONFIG))
def test_every_field_of_peft_s_config_is_known_or_refused(peft_type: str) -> None:
    """A PEFT release that adds a field fails here until it is classified (honored, no effect, or refused)."""
    known, refused = CONFIG_FIELDS[peft_type]
    fields = {f.name for f in dataclasses.fields(getattr(peft, CONFIG[peft_type]))}
    assert fields - COMMON_FIELDS - set(known) - set(refused) == set()
    assert not set(known) & set(refused)


@pytest.mark.parametrize("peft_type", list(CONFIG))
def test_an_unknown_field_that_is_set_is_refused_unless_ignored(peft_type: str, tmp_path: Path) -> None:
    # a later PEFT's field (made up here) was ignored without a word by every import but LoRA's
    arch, settings = BASIC[peft_type]
    expected, inputs = _save(CONFIG[peft_type], arch, tmp_path, **settings)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"future_option": 2, "future_off": None}))
    with pytest.raises(PeftFormatError, match=r"sets future_option=2, unknown .* ignore_fields=\['future_option'\]"):
        import_peft(_model(arch), tmp_path)
    dm = import_peft(_model(arch), tmp_path, ignore_fields=["future_option"])
    _assert_peft_s_outputs(dm, expected, inputs, arch)


# -- options, against PEFT ----------------------------------------------------------------------------
EQUAL = {
    "loha-dropouts": ("LoHaConfig", "bert", {"r": 4, "rank_dropout": 0.5, "module_dropout": 0.5}),
    "loha-conv2d-option-on-linear": ("LoHaConfig", "llama", {"r": 4, "use_effective_conv2d": True}),
    "loha-random-init": ("LoHaConfig", "bert", {"r": 4, "init_weights": False}),
    "lokr-factor": ("LoKrConfig", "llama", {"r": 2, "decompose_factor": 4, "target_modules": ["q_proj", "down_proj"]}),
    "lokr-decompose-both-full-w1": ("LoKrConfig", "bert", {"r": 8, "decompose_both": True}),
    "lokr-dropouts-conv2d": ("LoKrConfig", "bert", {"r": 2, "rank_dropout": 0.5, "rank_dropout_scale": True,
                                                    "module_dropout": 0.5, "use_effective_conv2d": True}),
    "lokr-lycoris-init": ("LoKrConfig", "bert", {"r": 2, "init_weights": "lycoris"}),
    "oft-r": ("OFTConfig", "bert", {"r": 4, "oft_block_size": 0}),
    "oft-adjusted-block": ("OFTConfig", "llama", {"r": 0, "oft_block_size": 12,
                                                  "target_modules": ["q_proj", "down_proj"]}),
    "oft-dropout-eps": ("OFTConfig", "bert", {"r": 0, "oft_block_size": 8, "module_dropout": 0.5, "eps": 1e-3}),
    "oft-exact-cayley": ("OFTConfig", "bert", {"r": 0, "oft_block_size": 8, "use_cayley_neumann": False}),
    "vera-unsaved-projections": ("VeraConfig", "llama", {"r": 16, "save_projection": False, "projection_prng_key": 7,
                                                         "target_modules": ["q_proj", "down_proj"]}),
    "vera-init-dropout": ("VeraConfig", "bert", {"r": 16, "d_initial": 0.5, "vera_dropout": 0.3}),
    "adalora-lora-options": ("AdaLoraConfig", "bert", {"init_r": 6, "target_r": 2, "total_step": 10, "r": 4,
                                                       "use_rslora": True, "alpha_pattern": {"query": 3},
                                                       "lora_bias": True, "lora_dropout": 0.2}),
    "adalora-alpha-0": ("AdaLoraConfig", "bert", {"init_r": 6, "target_r": 2, "total_step": 10, "lora_alpha": 0}),
    "ia3-random-init": ("IA3Config", "bert", {"target_modules": ["key", "value"], "feedforward_modules": [],
                                              "init_ia3_weights": False}),
    "ia3-conv1d": ("IA3Config", "gpt2", {"feedforward_modules": ["mlp.c_proj"], "fan_in_fan_out": True}),
    "prompt-vocab-init": ("PromptTuningConfig", "bert", {"num_virtual_tokens": 3, "prompt_tuning_init": "SAMPLE_VOCAB"}),
    "prompt-layer-counts": ("PromptTuningConfig", "llama", {"num_virtual_tokens": 3, "num_layers": 7,
                                                            "num_attention_heads": 3}),
    "prefix-projection": ("PrefixTuningConfig", "llama", {"num_virtual_tokens": 3, "prefix_projection": True,
                                                          "encoder_hidden_size": 20}),
    "prefix-zero-init": ("PrefixTuningConfig", "llama", {"num_virtual_tokens": 3, "init_weights": "zero"}),
    # PiSSA's init leaves an embedding's LoRA plain: an SVD of the table failed on "Sizes of tensors must match"
    "lora-pissa-embedding": ("LoraConfig", "llama", {"r": 4, "target_modules": ["embed_tokens", "q_proj"],
                                                    "init_lora_weights": "pissa"}),
    # VeLoRA compresses activations for training; its saved buffer (lora_velora_embed) failed the import
    "lora-velora": ("LoraConfig", "llama", {"r": 4, "velora_config": peft.VeloraConfig()} if hasattr(peft, "VeloraConfig") else {"r": 4}),
}  # fmt: skip
REFUSED = {
    "loha-rank-pattern": ("LoHaConfig", "bert", {"r": 4, "rank_pattern": {"query": 2}}, r"per-module ranks"),
    "loha-alpha-pattern": ("LoHaConfig", "bert", {"r": 4, "alpha_pattern": {"query": 2}}, r"per-module alphas"),
    "lokr-rank-pattern": ("LoKrConfig", "bert", {"r": 2, "rank_pattern": {"query": 1}}, r"per-module ranks"),
    "lokr-decompose-both": ("LoKrConfig", "bert", {"r": 1, "decompose_both": True},
                            r"lokr_w1_a', made by decompose_both .* cannot represent"),
    "oft-coft": ("OFTConfig", "bert", {"r": 0, "oft_block_size": 8, "coft": True}, r"constrained OFT \(coft\)"),
    "oft-block-share": ("OFTConfig", "bert", {"r": 0, "oft_block_size": 8, "block_share": True}, r"block_share"),
    "oft-bias": ("OFTConfig", "bert", {"r": 0, "oft_block_size": 8, "bias": "oft_only"}, r"bias='oft_only'"),
    "oft-r-on-two-widths": ("OFTConfig", "llama", {"r": 4, "oft_block_size": 0, "target_modules": ["q_proj", "down_proj"]},
                            r"r=4 blocks per layer, so its block sizes differ .* retrain with oft_block_size"),
    "vera-bias": ("VeraConfig", "bert", {"r": 16, "bias": "vera_only"}, r"bias='vera_only'"),
    "adalora-layer-replication": ("AdaLoraConfig", "bert", {"init_r": 6, "target_r": 2, "total_step": 10,
                                                            "layer_replication": [[0, 2], [1, 2]]},
                                  r"layer replication \(layer_replication\)"),
    "adalora-trainable-tokens": ("AdaLoraConfig", "bert", {"init_r": 6, "target_r": 2, "total_step": 10,
                                                           "trainable_token_indices": [3, 4]},
                                 r"trainable tokens \(trainable_token_indices\)"),
    "prompt-two-submodules": ("PromptTuningConfig", "llama", {"num_virtual_tokens": 3, "num_transformer_submodules": 2},
                              r"num_transformer_submodules=1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EQUAL))
def test_a_peft_option_deltatune_honors_or_that_leaves_the_outputs_imports_equal(case: str, tmp_path: Path) -> None:
    config_cls, arch, settings = EQUAL[case]
    expected, inputs = _save(config_cls, arch, tmp_path, **settings)
    _assert_peft_s_outputs(import_peft(_model(arch), tmp_path), expected, inputs, arch)


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_peft_option_deltatune_cannot_represent_is_refused_by_name(case: str, tmp_path: Path) -> None:
    config_cls, arch, settings, match = REFUSED[case]
    _save(config_cls, arch, tmp_path, **settings)
    with pytest.raises(PeftFormatError, match=match):
        import_peft(_model(arch), tmp_path)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_adalora_saved_after_rank_allocation_imports_with_its_ranks(arch: str, tmp_path: Path) -> None:
    """PEFT saves only the kept triplets (rank_pattern); was refused as "another base model?"."""
    head = "cls" if arch == "bert" else "lm"
    config = peft.AdaLoraConfig(target_modules=TARGETS[arch], task_type=TASK[head], init_r=6, target_r=2, tinit=1,
                                tfinal=3, total_step=10)  # fmt: skip
    pm = peft.get_peft_model(make_model(arch, head), config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    inputs = make_inputs(make_model(arch, head))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, 11):
        pm(**inputs).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval().save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    dm = import_peft(make_model(arch, head), tmp_path)
    _assert_peft_s_outputs(dm, logits(pm, inputs), inputs, arch)
    assert dm.delta().ranks() == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert max(dm.delta().ranks().values()) < 6  # PEFT saved fewer than init_r ranks in every module


@pytest.mark.parametrize("kind,arch", [("PromptTuningConfig", "bert"), ("PrefixTuningConfig", "llama")])
def test_a_prompt_adapter_without_a_task_type_is_refused(kind: str, arch: str, tmp_path: Path) -> None:
    # PeftModel(model, config) accepts task_type=None and then never prepends the prompt (PEFT's reload
    # computes the base model's outputs); the import prepended it: logits 0.033 (BERT) to 0.46 (Llama prefix) apart
    pm = peft.PeftModel(_model(arch), getattr(peft, kind)(num_virtual_tokens=3))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match=r"task_type=None, under which PEFT never prepends"):
        import_peft(_model(arch), tmp_path)


def test_a_prompt_delta_on_a_model_without_a_peft_task_type_is_not_exported(tmp_path: Path) -> None:
    # the folder said task_type=None and PEFT ran BertForQuestionAnswering without the prompt: start logits 0.13
    # from deltatune's, no error
    config = make_config("bert")
    config.num_labels = 2
    dm = dt.attach(transformers.BertForQuestionAnswering(config), dt.METHODS["prompt"](num_tokens=3, positions="shift"))
    with pytest.raises(PeftFormatError, match="BertForQuestionAnswering maps to no PEFT task type"):
        export_peft(dm, tmp_path)


@pytest.mark.parametrize(
    ("config_cls", "dropped", "kwargs"),
    [
        ("LoraConfig", ["lora_alpha"], {"r": 4}),
        ("LoHaConfig", ["alpha"], {"r": 4}),
        ("LoKrConfig", ["alpha"], {"r": 4}),
        ("AdaLoraConfig", ["lora_alpha", "target_r", "tinit", "tfinal", "deltaT"], {"init_r": 12, "total_step": 10}),
    ],
)
def test_a_field_left_out_of_the_file_takes_peft_s_default(
    config_cls: str, dropped: list[str], kwargs: dict, tmp_path: Path
) -> None:
    """PEFT fills a field its config class has a default for; without `lora_alpha` deltatune took alpha = r (logits
    0.16 off on tiny Llama, 6.4 with LoRA on the LM head), without LoHa's `alpha` or AdaLoRA's `target_r` it failed
    on a bare KeyError."""
    expected, inputs = _save(config_cls, "llama", tmp_path, **kwargs)
    file = tmp_path / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({k: v for k, v in config.items() if k not in dropped}))
    again = peft.PeftModel.from_pretrained(_model("llama"), tmp_path).eval()
    torch.testing.assert_close(logits(again, inputs), expected, rtol=0, atol=1e-6)  # PEFT reads it so
    _assert_peft_s_outputs(import_peft(_model("llama"), tmp_path), expected, inputs, "llama")
