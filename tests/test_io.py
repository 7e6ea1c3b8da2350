"""Delta checkpoints: exact round trips, and every way a load can go wrong gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.io import META, WEIGHTS, _sealed, read_meta


def _trained(method: str, arch: str = "bert", seed: int = 0) -> dt.DeltaModel:
    dm = dt.attach(make_model(arch), dt.METHODS[method](), train_head=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta().parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return dm


def _rehash(folder: Path) -> None:
    import hashlib

    meta = json.loads((folder / META).read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    (folder / META).write_bytes(_sealed(meta))  # and delta.json's own hash: a deliberate, complete edit


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", list(dt.METHODS))
def test_save_load_round_trip_reproduces_outputs(method: str, arch: str, tmp_path: Path) -> None:
    dm = _trained(method, arch)
    inputs = make_inputs(dm.backbone)
    expected = logits(dm, inputs)
    dm.save_delta(tmp_path / "d")
    loaded = dt.load_delta(make_model(arch), tmp_path / "d")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-6)
    assert loaded.delta().config.to_dict() == dm.delta().config.to_dict()


def test_checkpoint_holds_only_the_delta(tmp_path: Path) -> None:
    dm = _trained("lora")
    dm.save_delta(tmp_path / "d", epoch=3)
    size = (tmp_path / "d" / WEIGHTS).stat().st_size
    assert size <= dm.delta_parameters() * 4 + 16 * 1024
    meta = json.loads((tmp_path / "d" / META).read_text())
    assert meta["num_parameters"] == dm.delta_parameters()
    assert meta["metadata"] == {"epoch": 3}
    assert meta["backbone"]["model_type"] == "bert"
    assert read_meta(tmp_path / "d")["sites"] == dm.delta().sites


def test_sites_are_stored_as_layer_ranges_and_plain_names_still_load(tmp_path: Path) -> None:
    from deltatune.core.io import compact_sites, expand_sites

    sites = {f"m.layers.{i}.q": 8 for i in (0, 1, 2, 5)} | {f"m.layers.{i}.v": 4 for i in range(3)} | {"m.x": 1}
    assert compact_sites(sites) == {"m.layers.{0-2,5}.q": 8, "m.layers.{0-2}.v": 4, "m.x": 1}
    assert expand_sites(compact_sites(sites)) == sites
    dm = _trained("lora")
    inputs = make_inputs(dm.backbone)
    dm.save_delta(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / META).read_text())
    assert all("{" in key for key in meta["sites"])  # every LoRA site of a layered model folds into a range
    meta["sites"] = dm.delta().sites  # the layout written before ranges: one plain name per site
    del meta["meta_sha256"]  # nor did delta.json carry its own hash then
    (tmp_path / "d" / META).write_text(json.dumps(meta, indent=2))
    loaded = dt.load_delta(make_model("bert"), tmp_path / "d")
    torch.testing.assert_close(logits(loaded, inputs), logits(dm, inputs), rtol=0, atol=1e-6)


def test_loading_onto_another_architecture_names_both(tmp_path: Path) -> None:
    _trained("lora").save_delta(tmp_path / "d")
    with pytest.raises(dt.DeltaIOError, match=r"trained on BertForSequenceClassification.*the model is GPT2"):
        dt.load_delta(make_model("gpt2"), tmp_path / "d")


def test_loading_onto_other_weights_of_the_same_shape_is_refused(tmp_path: Path) -> None:
    _trained("lora").save_delta(tmp_path / "d")
    with pytest.raises(dt.DeltaIOError, match="same shapes but other weights"):
        dt.load_delta(make_model("bert", seed=5), tmp_path / "d")


def test_batched_signatures_equal_each_tensor_summed_alone() -> None:
    """Signatures are computed for all parameters at once (grouped by sample length); each must be
    exactly its own tensor's, or every saved delta would be checked against the wrong parameter."""
    from deltatune.core import identity

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) for shape in [(7,), (384,), (64, 64), (3, 5), (1000,)]]
    for tensor, sig in zip(tensors, identity.signatures(tensors), strict=True):
        flat = tensor.reshape(-1).double()
        n = min(flat.numel(), 256)
        values = flat[[i * (flat.numel() - 1) // max(n - 1, 1) for i in range(n)]]
        expected = [float((identity._signs(n, k) * values).sum()) for k in (0, 1)] + [float(values.abs().sum())]
        assert sig == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_a_bf16_copy_of_the_backbone_accepts_the_delta_kept_in_fp32(tmp_path: Path) -> None:
    """Beside bf16 weights a delta keeps float32 parameters (PEFT's `autocast_adapter_dtype`): it trains, and it
    computes in the layer's dtype."""
    trained = _trained("lora")
    trained.save_delta(tmp_path / "d")
    model = make_model("bert").to(torch.bfloat16)
    loaded = dt.load_delta(model, tmp_path / "d")
    assert {p.dtype for p in loaded.delta().parameters()} == {torch.float32}
    assert all(torch.equal(v, trained.delta_state_dict()[k]) for k, v in loaded.delta_state_dict().items())
    assert loaded(**make_inputs(model)).logits.dtype == torch.bfloat16


def test_truncated_weights_file_is_reported(tmp_path: Path) -> None:
    _trained("lora").save_delta(tmp_path / "d")
    file = tmp_path / "d" / WEIGHTS
    file.write_bytes(file.read_bytes()[:100])
    model = make_model("bert")
    with pytest.raises(dt.DeltaIOError, match="truncated or corrupted"):
        dt.load_delta(model, tmp_path / "d")
    assert not any(m._forward_hooks for m in model.modules())


def test_hand_edited_json_is_reported(tmp_path: Path) -> None:
    _trained("lora").save_delta(tmp_path / "d")
    meta_file = tmp_path / "d" / META
    meta = json.loads(meta_file.read_text())
    meta["config"]["rank_typo"] = 4
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(dt.DeltaIOError, match="setting 'rank_typo' it does not have"):
        dt.load_delta(make_model("bert"), tmp_path / "d")
    meta_file.write_text("{not json")
    with pytest.raises(dt.DeltaIOError, match="not valid JSON"):
        dt.load_delta(make_model("bert"), tmp_path / "d")


def test_keys_that_do_not_fit_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _trained("lora").save_delta(tmp_path / "d")
    file = tmp_path / "d" / WEIGHTS
    tensors = load_file(str(file))
    first = sorted(k for k in tensors if not k.startswith("__head__."))[0]
    tensors["surprise"] = tensors.pop(first)
    save_file(tensors, str(file))
    _rehash(tmp_path / "d")  # a deliberate edit that also updates the recorded hash: the keys are what fail
    with pytest.raises(dt.DeltaIOError, match=rf"missing keys \['{first}'\], unexpected keys \['surprise'\]"):
        dt.load_delta(make_model("bert"), tmp_path / "d")


def test_a_frozen_new_head_is_saved_so_the_outputs_survive_a_fresh_load(tmp_path: Path) -> None:
    # train_head=False on a classifier: its random head shapes the outputs, and the next load of the
    # model draws another one; without it in the folder the reloaded delta gave other outputs, silently
    dm = _trained("lora")
    inputs = make_inputs(dm.backbone)
    dm.save_delta(tmp_path / "d")
    dm.save_pretrained(tmp_path / "p")
    other = make_model("bert", seed=5)  # the same backbone, another draw of its new head
    with torch.no_grad():
        for n, p in other.named_parameters():
            if not n.startswith("classifier."):
                p.copy_(dict(dm.backbone.named_parameters())[n])
    assert not torch.equal(other.classifier.weight, dm.backbone.classifier.weight)
    torch.testing.assert_close(logits(dt.load_delta(other, tmp_path / "d"), inputs), logits(dm, inputs))
    lm = dt.attach(make_model("gpt2", "lm"), dt.LoRAConfig(targets="c_attn"))  # a pretrained LM head is the backbone's
    lm.save_delta(tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / META).read_text())["head_parameters"] == 0


def test_load_delta_names_the_loader_of_a_peft_or_save_pretrained_folder(tmp_path: Path) -> None:
    with pytest.raises(dt.DeltaIOError, match="nope: no such folder"):
        dt.load_delta(make_model("bert"), tmp_path / "nope")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(
        dt.DeltaIOError, match=r"is a PEFT or AdapterHub adapter: load it with .*import_peft.* or import_adapterhub"
    ):
        dt.load_delta(make_model("bert"), tmp_path / "peft")
    dm = dt.DeltaModel(make_model("bert"))
    dm.add("a", dt.LoRAConfig())
    dm.add("b", dt.METHODS["ia3"]())
    dm.save_pretrained(tmp_path / "several")
    with pytest.raises(
        dt.DeltaIOError, match=r"holds several deltas \(save_pretrained\): .*DeltaModel.from_pretrained"
    ):
        dt.load_delta(make_model("bert"), tmp_path / "several")


def test_folder_without_json_and_merged_delta_are_refused(tmp_path: Path) -> None:
    with pytest.raises(dt.DeltaIOError, match="not a delta folder"):
        dt.load_delta(make_model("bert"), tmp_path)
    dm = _trained("lora")
    dm.merge()
    with pytest.raises(dt.DeltaIOError, match="unmerge it before saving"):
        dm.save_delta(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_failed_save_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _trained("lora")
    dm.save_delta(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}

    def boom(*args: object, **kwargs: object) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save", boom)
    with torch.no_grad():
        next(dm.delta().parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        dm.save_delta(tmp_path / "d")
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_head_of_another_size_names_the_label_count(tmp_path: Path) -> None:
    dm = _trained("lora")  # tiny models have 3 labels
    dm.save_delta(tmp_path / "d", include_head=True)
    import transformers as tf
    from tiny import make_config

    config = make_config("bert")
    config.num_labels = 2
    torch.manual_seed(0)
    other = tf.BertForSequenceClassification(config).eval()
    with pytest.raises(dt.DeltaIOError, match=r"same number of labels \(num_labels=3\)"):
        dt.load_delta(other, tmp_path / "d")
    assert not any(m._forward_hooks for m in other.modules())


@pytest.mark.parametrize(
    "edit,fragment",
    [
        ({"method": "lorra"}, "unknown method 'lorra'"),
        ({"r": 0}, "invalid lora config: .*r must be a positive integer"),
    ],
)
def test_json_naming_a_bad_method_or_value_is_refused(edit: dict, fragment: str, tmp_path: Path) -> None:
    _trained("lora").save_delta(tmp_path / "d")
    meta_file = tmp_path / "d" / META
    meta = json.loads(meta_file.read_text())
    meta["config"].update(edit)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(dt.DeltaIOError, match=fragment):
        dt.load_delta(make_model("bert"), tmp_path / "d")


def test_saving_over_a_folder_that_is_not_a_delta_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(dt.DeltaIOError, match="not a delta folder; choose another path"):
        _trained("lora").save_delta(tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_exporting_into_a_non_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        _trained("lora").export_merged(tmp_path / "out")


def test_fingerprint_probes_reach_the_end_of_huge_tensors() -> None:
    from deltatune.core.io import _probe_index

    idx = _probe_index(28_311_552, 8)  # SmolLM2's embedding: float positions rounded past the end
    assert idx[-1].item() == 28_311_551 and idx[0].item() == 0 and len(idx) == 8
