"""save_pretrained / from_pretrained round-trip the deltas; nothing that saves weights drops them silently."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.io import DeltaIOError, reseal


def _perturbed(dm: dt.DeltaModel) -> dt.DeltaModel:
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return dm


@pytest.mark.parametrize("method", ["lora", "bitfit", "ia3", "prompt"])
def test_round_trip_gives_equal_outputs(method: str, tmp_path: Path) -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = _perturbed(dt.attach(model, dt.METHODS[method](), train_head=True))
    expected = logits(dm, inputs)
    dm.save_pretrained(tmp_path / "out")
    loaded = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "out")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    assert loaded.train_head
    assert dt.load_delta(make_model("bert"), tmp_path / "out") is not None  # one delta: a save_delta folder


def test_several_deltas_keep_names_and_enabled_flags(tmp_path: Path) -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = _perturbed(dt.attach(model, dt.METHODS["lora"](), name="a"))
    dm.add("b", dt.METHODS["bitfit"]())
    dm.add("c", dt.METHODS["bitfit"](), enabled=False)
    _perturbed(dm)
    expected = logits(dm, inputs)
    dm.save_pretrained(tmp_path / "out")
    loaded = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "out")
    assert list(loaded.deltas) == ["a", "b", "c"]
    assert [d.enabled for d in loaded.deltas.values()] == [True, True, False]
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    loaded.set_active(["a", "c"])
    dm.set_active(["a", "c"])
    torch.testing.assert_close(logits(loaded, inputs), logits(dm, inputs), rtol=0, atol=0)


def test_save_pretrained_writes_no_backbone_weights_and_keeps_other_files(tmp_path: Path) -> None:
    dm = _perturbed(dt.attach(make_model("bert"), dt.METHODS["bitfit"](), train_head=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    dm.save_pretrained(out)
    assert (out / "tokenizer.json").read_text() == "{}"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["delta.json", "delta.safetensors", "deltatune_model.json", "tokenizer.json"]
    from safetensors.torch import load_file

    keys = load_file(str(out / "delta.safetensors"))
    assert not any("parametrizations" in k or "original" in k for k in keys)
    assert sum(v.numel() for k, v in keys.items() if not k.startswith("__head__.")) == dm.delta_parameters()


def test_state_dict_is_what_training_changes() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["bitfit"](), train_head=True)
    state = dm.state_dict()
    backbone_keys = {k for k in state if k.startswith("backbone.")}
    assert backbone_keys == {"backbone.classifier.weight", "backbone.classifier.bias"}
    assert sum(v.numel() for v in state.values()) == dm.trainable_parameters()
    fresh = dt.attach(make_model("bert", seed=5), dt.METHODS["bitfit"](), train_head=True)
    assert not fresh.load_state_dict(state, strict=True).missing_keys
    assert torch.equal(fresh.backbone.classifier.weight, dm.backbone.classifier.weight)


def test_state_dict_keeps_a_frozen_new_head_so_a_trainer_resume_in_a_new_process_matches() -> None:
    """Trainer checkpoints are `state_dict()`; a classifier head left frozen (train_head=False) is still
    new and random, and a new process draws another: without it the resumed model gives other outputs."""
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"](), train_head=False)
    state = dm.state_dict()
    assert {k for k in state if k.startswith("backbone.")} == {"backbone.classifier.weight", "backbone.classifier.bias"}
    other = make_model("bert")
    torch.nn.init.normal_(other.classifier.weight)  # the same backbone, another draw of the new head
    fresh = dt.attach(other, dt.METHODS["lora"](), train_head=False)
    inputs = make_inputs(dm.backbone)
    assert not torch.equal(logits(fresh, inputs), logits(dm, inputs))
    fresh.load_state_dict(state, strict=False)
    assert torch.equal(logits(fresh, inputs), logits(dm, inputs))


@pytest.mark.parametrize("attr", ["push_to_hub", "load_adapter", "add_adapter", "unload"])
def test_backbone_calls_that_would_lose_the_delta_name_the_right_call(attr: str) -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
    assert hasattr(dm.backbone, attr) or attr == "unload"
    with pytest.raises(AttributeError, match="dm\\.|deltatune"):
        getattr(dm, attr)


@pytest.mark.parametrize(
    "attr, call",
    [("delete_adapter", "dm.detach(name)"), ("active_adapters", "dm.tree()"), ("disable_adapter", "dm.disable(name)"),
     ("merge_adapter", "dm.merge(name)"), ("get_base_model", "dm.backbone"), ("peft_config", "dm.delta(name).config")],
)  # fmt: skip
def test_peftmodel_calls_a_migrated_script_keeps_name_deltatunes_call(attr: str, call: str) -> None:
    """delete_adapter reached transformers' PEFT integration ("The version of PEFT you are using is not compatible"),
    the others the backbone's bare "no attribute"."""
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
    with pytest.raises(AttributeError, match=rf"DeltaModel\.{attr} is PEFT's.*; .*{re.escape(call)}"):
        getattr(dm, attr)


def test_print_trainable_parameters_prints_peft_s_line(capsys: pytest.CaptureFixture[str]) -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"](), train_head=False)
    dm.print_trainable_parameters()
    total = sum(p.numel() for p in dm.parameters())
    trainable = dm.delta_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}\n"
    )


def test_merge_and_unload_returns_a_plain_backbone_with_equal_outputs() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = _perturbed(dt.attach(model, dt.METHODS["bitfit"]()))
    expected = logits(dm, inputs)
    plain = dm.merge_and_unload()
    assert plain is model and not isinstance(plain, dt.DeltaModel)
    assert not any("parametrizations" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=0, atol=1e-6)


def test_from_pretrained_on_a_peft_folder_names_the_importer(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(DeltaIOError, match="import_peft"):
        dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)


def test_saving_several_deltas_over_one_leaves_no_stale_single_delta(tmp_path: Path) -> None:
    dm = _perturbed(dt.attach(make_model("bert"), dt.METHODS["lora"]()))
    dm.save_pretrained(tmp_path / "out")
    dm.add("bits", dt.METHODS["bitfit"]())
    dm.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "delta.json").exists()
    with pytest.raises(DeltaIOError):
        dt.load_delta(make_model("bert"), tmp_path / "out")  # not silently the old single delta
    assert list(dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "out").deltas) == ["default", "bits"]


def test_the_keywords_scripts_pass_to_save_pretrained_are_taken_or_named(tmp_path: Path) -> None:
    """transformers' `*_no_trainer` scripts call `save_pretrained(out, is_main_process=..., save_function=
    accelerator.save)`: a TypeError here, where PEFT takes them. Those that change nothing are taken; PEFT's
    `selected_adapters` saves those deltas; a keyword that would change what is written is refused by name."""
    import accelerate

    model = make_model("bert")
    dm = _perturbed(dt.attach(model, "lora"))
    dm.add("b", "bitfit")
    _perturbed(dm)
    acc = accelerate.Accelerator(cpu=True)
    dm.save_pretrained(
        tmp_path / "a", is_main_process=acc.is_main_process, save_function=acc.save, max_shard_size="5GB"
    )
    again = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "a")
    assert torch.equal(logits(again, make_inputs(model)), logits(dm, make_inputs(model)))
    dm.save_pretrained(tmp_path / "b", selected_adapters=["b"], push_to_hub=False, token=None)
    assert list(dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "b").deltas) == ["b"]
    for kwargs, error, said in [
        ({"variant": "fp16"}, TypeError, "got 'variant', which a delta folder has no use for"),
        ({"push_to_hub": True}, ValueError, "push_to_hub is not offered: save the folder, then huggingface_hub"),
        ({"state_dict": model.state_dict()}, ValueError, "state_dict= is not taken"),
        ({"selected_adapters": ["lroa"]}, ValueError, r"selected_adapters \['lroa'\] must name deltas of this model"),
    ]:
        with pytest.raises(error, match=said):
            dm.save_pretrained(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_deltas_saved_one_by_one_warn_when_loaded_out_of_their_order(tmp_path: Path) -> None:
    """Hooks on one module run in attach order: LoRA then an adapter is another model than the adapter then
    LoRA (0.26 apart after five steps on a tiny Llama). Saved one by one and loaded the other way round, the
    model changed without a word; delta.json now records the order and loading warns."""
    model = make_model("llama", "lm")
    inputs = make_inputs(model)
    dm = dt.DeltaModel(model)
    dm.add("first", dt.METHODS["lora"](targets=("attn.k", "attn.v", "attn.o")), train_head=False)
    dm.add("second", dt.METHODS["adapter"]())
    _perturbed(dm)
    dm.save_delta(tmp_path / "first", "first")
    dm.save_delta(tmp_path / "second", "second")
    same = dt.DeltaModel(make_model("llama", "lm"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved order: no warning, the same model
        dt.load_delta(same, tmp_path / "first", "first")
        dt.load_delta(same, tmp_path / "second", "second")
    torch.testing.assert_close(logits(same, inputs), logits(dm, inputs), rtol=0, atol=0)
    renamed = dt.DeltaModel(make_model("llama", "lm"))  # recognised by content: no warning under other names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.load_delta(renamed, tmp_path / "first", "style")
        dt.load_delta(renamed, tmp_path / "second", "task")
    older = json.loads((tmp_path / "second" / "delta.json").read_text())
    assert [e["name"] for e in older["after"]] == ["first"]
    older["after"] = ["first"]  # a delta.json written before contents were recorded: names alone
    (tmp_path / "second" / "delta.json").write_text(json.dumps(older))
    reseal(tmp_path / "second")
    with pytest.warns(UserWarning, match=r"'task' was saved after \['first'\]"):
        dt.load_delta(
            dt.load_delta(dt.DeltaModel(make_model("llama", "lm")), tmp_path / "first", "style"),
            tmp_path / "second",
            "task",
        )
    swapped = dt.DeltaModel(make_model("llama", "lm"))
    with pytest.warns(UserWarning, match=r"'second' was saved after \['first'\] on the same modules, which do not"):
        dt.load_delta(swapped, tmp_path / "second", "second")
    dt.load_delta(swapped, tmp_path / "first", "first")
    assert not torch.allclose(logits(swapped, inputs), logits(dm, inputs), atol=1e-4)  # what the warning is about
    both = dt.DeltaModel(make_model("bert"))  # deltas that only add to the weights commute: nothing recorded
    both.add("a", dt.METHODS["lora"]())
    both.add("b", dt.METHODS["lora"]())
    both.save_delta(tmp_path / "b", "b")
    assert json.loads((tmp_path / "b" / "delta.json").read_text())["after"] == []
