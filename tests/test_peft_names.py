"""PEFT folders whose keys or heads do not line up with the model they are imported onto, and PEFT exports
that wrote more (or other) weights than the delta: each case was found importing or exporting as users do.

- an adapter of the bare backbone (BertModel) on its task model (BertForSequenceClassification): a torch
  KeyError, and the half-attached delta stayed on the model;
- a second adapter with its own head replaced the first's head without a word;
- PEFT's `save_embedding_layers="auto"` copy of an untouched `lm_head.base_layer.weight`: refused as a tensor
  "this model lacks";
- a merged layernorm delta exported as W + 2D; every causal LM's export carried its frozen lm_head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from tiny import logits, make_config, make_inputs, make_model

import deltatune as dt
from deltatune.core.marks import OWNER
from deltatune.interop import PeftFormatError, export_peft, import_peft

peft = pytest.importorskip("peft")


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _hooked(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_an_adapter_of_the_bare_backbone_loads_onto_its_task_model_and_back(tmp_path: Path) -> None:
    """transformers loads a BertModel checkpoint into BertForSequenceClassification by `base_model_prefix`; the
    adapter's module names are read the same way (PEFT leaves such an adapter unused, with a warning)."""
    classifier = make_model("bert")
    pm = peft.get_peft_model(classifier.bert, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    _perturb(pm)
    pm.eval().save_pretrained(tmp_path / "bare")
    inputs = {k: v for k, v in make_inputs(classifier).items() if k != "labels"}
    expected = pm(**inputs).last_hidden_state
    dm = import_peft(make_model("bert"), tmp_path / "bare")  # same seed: the same weights as `classifier`
    assert torch.allclose(dm.eval().backbone.bert(**inputs).last_hidden_state, expected, atol=1e-6)
    assert all(s.startswith("bert.encoder.") for s in dm.delta("default").sites)
    # the reverse: an adapter saved on the task model (no head saved) onto the bare backbone
    pm2 = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=4, target_modules=["query"]))
    _perturb(pm2, seed=1)
    pm2.eval().save_pretrained(tmp_path / "task")
    expected = pm2.base_model.model.bert(**inputs).last_hidden_state
    bare = tf.BertModel(make_config("bert"))
    bare.load_state_dict(make_model("bert").bert.state_dict())
    got = import_peft(bare, tmp_path / "task").eval()(**inputs).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-6)


def test_an_adapter_of_another_stack_is_refused_naming_the_modules_and_leaves_the_model_bare(tmp_path: Path) -> None:
    t5 = make_model("t5", "lm")
    pm = peft.get_peft_model(t5.encoder, peft.LoraConfig(r=4, target_modules=["q", "v"]))
    pm.save_pretrained(tmp_path / "enc")
    model = make_model("t5", "lm")
    with pytest.raises(PeftFormatError, match=r"names module 'block.0.layer.0.SelfAttention.q', which this "
                       r"T5ForConditionalGeneration has only inside 'decoder.block.0.*'encoder.block.0"):  # fmt: skip
        import_peft(model, tmp_path / "enc")
    assert _hooked(model) == [] and OWNER not in vars(model)


def test_an_import_that_fails_after_attaching_leaves_the_model_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltatune.interop import peft_lora

    pm = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path / "a")

    def broken(*args: object) -> None:
        raise RuntimeError("disk went away")

    monkeypatch.setattr(peft_lora, "copy_head", broken)
    model = make_model("bert")
    with pytest.raises(RuntimeError, match="disk went away"):
        import_peft(model, tmp_path / "a")
    assert _hooked(model) == [] and OWNER not in vars(model)
    model.save_pretrained(tmp_path / "plain")  # not refused: no delta acts on it
    dm = dt.attach(make_model("bert"), "bitfit")
    with pytest.raises(RuntimeError, match="disk went away"):
        import_peft(dm, tmp_path / "a", name="b")
    assert list(dm.deltas) == ["default"]  # the delta that was there stays; the new one is gone


def test_a_second_adapter_with_its_own_head_is_refused_not_swapped_in(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 1)):
        pm = peft.get_peft_model(
            make_model("bert"), peft.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")
        )
        _perturb(pm, seed)
        pm.eval().save_pretrained(tmp_path / name)
    inputs = make_inputs(make_model("bert"))
    dm = import_peft(make_model("bert"), tmp_path / "a", name="a").eval()
    before = logits(dm, inputs)
    with pytest.raises(ValueError, match=r"the adapter carries its own task head, but delta 'a' brought another.*"
                       r"import each adapter with its own head onto a model of its own"):  # fmt: skip
        import_peft(dm, tmp_path / "b", name="b")
    assert list(dm.deltas) == ["a"] and torch.equal(logits(dm, inputs), before)
    # a second adapter trained with the same head (the file's head equals the model's) is served beside it
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    head_a = {k: v for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items() if "lora" not in k}
    save_file(tensors | head_a, tmp_path / "b" / "adapter_model.safetensors")
    import_peft(dm, tmp_path / "b", name="b")
    assert set(dm.deltas) == {"a", "b"}


@pytest.mark.parametrize("kind", ["lora", "ln"])
def test_a_second_adapter_imported_switched_off_leaves_the_first_s_outputs(kind: str, tmp_path: Path) -> None:
    """`import_peft(..., enabled=False)` failed on a bare TypeError; PEFT's `load_adapter` leaves a second adapter
    inactive. Two LayerNorm adapters claim the same weights: the second must come in switched off."""
    for name, seed in (("a", 0), ("b", 1)):
        config = peft.LoraConfig(r=4, target_modules=["q_proj"]) if kind == "lora" else peft.LNTuningConfig()
        pm = peft.get_peft_model(make_model("llama", "lm"), config)
        _perturb(pm, seed)
        pm.eval().save_pretrained(tmp_path / name)
    inputs = make_inputs(make_model("llama", "lm"))
    dm = import_peft(make_model("llama", "lm"), tmp_path / "a", name="a").eval()
    first = logits(dm, inputs)
    import_peft(dm, tmp_path / "b", name="b", enabled=False)
    assert not dm.delta("b").enabled and torch.equal(logits(dm, inputs), first)
    dm.set_active("b")
    assert not torch.allclose(logits(dm, inputs), first)


def test_peft_copy_of_an_untouched_lm_head_base_weight_is_accepted_and_checked(tmp_path: Path) -> None:
    """PEFT's save_embedding_layers="auto" writes `lm_head.base_layer.weight` when lm_head is a target."""
    pm = peft.get_peft_model(
        make_model("llama", "lm"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    )
    _perturb(pm)
    pm.eval().save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in saved
    inputs = make_inputs(make_model("llama", "lm"))
    expected = logits(pm, inputs)
    dm = import_peft(make_model("llama", "lm"), tmp_path / "a").eval()
    assert torch.allclose(logits(dm, inputs), expected, atol=1e-5)
    assert not dm.backbone.lm_head.weight.requires_grad  # not a trained head: nothing was copied
    saved["base_model.model.lm_head.base_layer.weight"] = saved["base_model.model.lm_head.base_layer.weight"] + 1
    save_file(saved, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(PeftFormatError, match=r"saves 'lm_head.base_layer.weight', the base weight under its delta, "
                       r"and this model's differs"):  # fmt: skip
        import_peft(make_model("llama", "lm"), tmp_path / "a")


def test_a_merged_layernorm_delta_is_not_exported_as_whole_weights(tmp_path: Path) -> None:
    dm = dt.attach(make_model("bert"), "layernorm")
    _perturb(dm)
    dm.merge("default")
    with pytest.raises(dt.DeltaError, match=r"cannot export 'default' as PEFT LN tuning.*unmerge them first"):
        export_peft(dm, tmp_path / "ln")
    assert not (tmp_path / "ln").exists()
    dm.unmerge("default")
    export_peft(dm, tmp_path / "ln")
    inputs = make_inputs(make_model("bert"))
    reloaded = peft.PeftModel.from_pretrained(make_model("bert"), tmp_path / "ln").eval()
    assert torch.allclose(logits(reloaded, inputs), logits(dm.eval(), inputs), atol=1e-5)


def test_a_causal_lm_export_leaves_its_untrained_lm_head_out(tmp_path: Path) -> None:
    """Every causal LM's export wrote the frozen lm_head (vocabulary x hidden) as modules_to_save, which PEFT
    then trains; a LoRA on lm_head itself was refused unless include_head=False."""
    dm = dt.attach(make_model("llama", "lm"), "lora", r=4, targets=("q_proj", "lm_head"))
    _perturb(dm)
    export_peft(dm, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    assert all("lora_" in k for k in load_file(tmp_path / "a" / "adapter_model.safetensors"))
    inputs = make_inputs(make_model("llama", "lm"))
    reloaded = peft.PeftModel.from_pretrained(make_model("llama", "lm"), tmp_path / "a").eval()
    assert torch.allclose(logits(reloaded, inputs), logits(dm.eval(), inputs), atol=1e-5)
    # a head that trains is the adapter's: saved whole, and a delta on it then refused as before
    trained = dt.attach(make_model("llama", "lm"), "lora", r=4, targets=("q_proj",), train_head=True)
    export_peft(trained, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    dm.freeze(train_head=True)
    with pytest.raises(PeftFormatError, match=r"export with include_head=False if the head did not train"):
        export_peft(dm, tmp_path / "c")
