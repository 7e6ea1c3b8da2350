"""AdapterHub (`adapters` library) folders imported with AdapterHub's outputs, and what is refused.

tests/fixtures/adapterhub/ comes from scripts/make_adapterhub_fixtures.py run with adapters 1.3.0
(transformers 4.57.6): tiny random BERT/RoBERTa bases, one perturbed adapter folder per case and
AdapterHub's logits on fixed inputs. These tests need no `adapters` (CI also runs transformers 5.x,
which it does not support); `test_live_against_adapters` reruns the script where it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import deltatune as dt
import deltatune.interop
from deltatune.interop import AdapterHubFormatError, import_adapterhub

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
METHOD = {
    "seq_bn": "norm_adapter", "seq_bn_bin": "norm_adapter", "seq_bn_mh_leave_out": "norm_adapter",
    "double_seq_bn": "adapter", "double_seq_bn_bin": "adapter", "houlsby_ffn_only": "adapter",
    "par_bn": "parallel_adapter", "lora": "lora", "lora_all_bin": "lora", "ia3": "ia3", "ia3_bin": "ia3",
    "roberta_seq_bn": "norm_adapter", "roberta_lora": "lora", "roberta_double_seq_bn": "adapter",
}  # fmt: skip
TOL = 1e-5


def _base(fixtures: Path, case: str) -> torch.nn.Module:
    arch = "roberta" if case.startswith("roberta") else "bert"
    return tf.AutoModelForSequenceClassification.from_pretrained(fixtures / f"base_{arch}").eval()


def _check_case(fixtures: Path, case: str, expected: dict[str, torch.Tensor]) -> float:
    inputs = {k: expected[k] for k in ("input_ids", "attention_mask")}
    dm = import_adapterhub(_base(fixtures, case), fixtures / case).eval()
    assert [d.config.method for d in dm.deltas.values()] == [METHOD[case]]
    assert list(dm.deltas) == [case]  # the adapter's own name
    with torch.no_grad():
        diff = (dm(**inputs).logits - expected[case]).abs().max().item()
        dm.disable(case)  # the delta matters: without it the outputs are far from AdapterHub's
        assert (dm(**inputs).logits - expected[case]).abs().max().item() > 1e-3
    return diff


@pytest.mark.parametrize("case", sorted(METHOD))
def test_imported_adapter_gives_adapterhubs_logits(case: str) -> None:
    assert _check_case(FIXTURES, case, load_file(str(FIXTURES / "expected.safetensors"))) <= TOL


def test_every_fixture_is_checked() -> None:
    cases = set(load_file(str(FIXTURES / "expected.safetensors"))) - {"input_ids", "attention_mask"}
    assert cases == set(METHOD)


def test_live_against_adapters(tmp_path: Path) -> None:
    """Where `adapters` is installed (it pins transformers 4.57): fresh folders from the script, same check."""
    pytest.importorskip("adapters")
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_adapterhub_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    expected = script.make_all(tmp_path)
    diffs = {case: _check_case(tmp_path, case, expected) for case in METHOD}
    assert max(diffs.values()) <= TOL, diffs


def test_a_bare_encoder_takes_the_adapter_and_leaves_the_head_out_with_one_warning() -> None:
    """Keys say bert.encoder...; a BertModel names it encoder...: placed all the same. Its head is not the model's."""
    inputs = {k: v for k, v in load_file(str(FIXTURES / "expected.safetensors")).items() if k != "seq_bn"}
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    full = import_adapterhub(_base(FIXTURES, "seq_bn"), FIXTURES / "seq_bn").eval()
    bare = tf.BertModel.from_pretrained(FIXTURES / "base_bert", add_pooling_layer=False).eval()
    with pytest.warns(UserWarning, match="AdapterHub head in .* is not imported: its tensors .*classifier"):
        bare = import_adapterhub(bare, FIXTURES / "seq_bn").eval()
    with torch.no_grad():
        want = full.backbone.bert(**inputs).last_hidden_state
        assert (bare(**inputs).last_hidden_state - want).abs().max().item() <= TOL


def test_the_head_is_copied_when_it_is_the_models_own_else_left_with_a_warning(tmp_path: Path) -> None:
    saved = load_file(str(FIXTURES / "seq_bn" / "model_head.safetensors"))
    dm = import_adapterhub(_base(FIXTURES, "seq_bn"), FIXTURES / "seq_bn")
    assert torch.equal(dm.backbone.classifier.weight, saved["classifier.weight"])
    assert dm.backbone.classifier.weight.requires_grad  # trained with the adapter: keeps training
    with pytest.warns(UserWarning, match="not imported: head=False"):
        dm = import_adapterhub(_base(FIXTURES, "seq_bn"), FIXTURES / "seq_bn", head=False)
    assert not torch.equal(dm.backbone.classifier.weight, saved["classifier.weight"])
    folder = _copy(tmp_path, "seq_bn")
    meta = json.loads((folder / "head_config.json").read_text())
    (folder / "head_config.json").write_text(json.dumps(meta | {"config": {"head_type": "classification"}}))
    with pytest.warns(UserWarning, match="flexible head \\(classification\\), not the model's own"):
        import_adapterhub(_base(FIXTURES, "seq_bn"), folder)


def _copy(tmp_path: Path, case: str) -> Path:
    return Path(shutil.copytree(FIXTURES / case, tmp_path / case))


def _edit(tmp_path: Path, case: str, **changes: object) -> Path:
    folder = _copy(tmp_path, case)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["config"] |= changes
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    return folder


REFUSED = [
    ("seq_bn", {"architecture": "prefix_tuning"}, r"is prefix tuning \(prefix_tuning\), which deltatune does not"),
    ("seq_bn", {"architecture": "prompt_tuning"}, r"prompt tuning"),
    ("seq_bn", {"architecture": "union"}, r"a union of methods \(MAM adapter, UniPELT"),
    ("seq_bn", {"architecture": "something"}, r"unknown AdapterHub architecture 'something'"),
    ("seq_bn", {"phm_layer": True}, r"uses PHM layers \(Compacter\) \(phm_layer=True\)"),
    ("seq_bn", {"use_gating": True}, r"uses gating \(use_gating=True\)"),
    ("seq_bn", {"ln_after": True}, r"a LayerNorm of its own after the adapter"),
    ("seq_bn", {"inv_adapter": "nice"}, r"invertible adapters"),
    ("seq_bn", {"original_ln_after": False}, r"original_ln_after=False"),
    ("seq_bn", {"residual_before_ln": False}, r"residual_before_ln=False with original_ln_before=True"),
    ("seq_bn", {"scaling": "learned"}, r"scaling='learned'; deltatune imports a positive number"),
    ("seq_bn", {"non_linearity": "gelu_10"}, r"non_linearity='gelu_10'; deltatune's bottleneck has relu, gelu"),
    ("seq_bn", {"non_linearity": "quick_gelu"}, r"non_linearity='quick_gelu'"),
    ("seq_bn", {"dropout": 0.1}, r"dropout=0.1, used in training only.*ignore_fields=\['dropout'\]"),
    ("seq_bn", {"shiny_option": 3}, r"sets shiny_option=3, unknown to .*ignore_fields=\['shiny_option'\]"),
    ("seq_bn", {"mh_adapter": True}, r"the mh_adapter tensors cover layers \[\]"),
    ("seq_bn", {"leave_out": [1]}, r"cover layers \[0, 1\], but with leave_out=\[1\]"),
    ("par_bn", {"mh_adapter": True}, r"parallel adapter also runs beside attention"),
    ("lora", {"use_dora": True}, r"uses AdapterHub's DoRA"),
    ("lora", {"vera_d": 0.1}, r"uses VeRA"),
    ("lora", {"composition_mode": "mul"}, r"composition_mode='mul'"),
    ("lora", {"r": 2}, r"are not lora_A \(r=2, in\)"),
    ("ia3", {"use_gating": True}, r"uses gating"),
]


@pytest.mark.parametrize("case,changes,match", REFUSED, ids=[f"{c}-{next(iter(k))}" for c, k, _ in REFUSED])
def test_what_cannot_be_represented_is_refused_in_one_line(
    tmp_path: Path, case: str, changes: dict, match: str
) -> None:
    folder = _edit(tmp_path, case, **changes)
    model = _base(FIXTURES, case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterHubFormatError, match=match) as err:
        import_adapterhub(model, folder)
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing attached or copied


def test_ignore_fields_imports_a_training_only_or_unknown_field(tmp_path: Path) -> None:
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    folder = _edit(tmp_path, "seq_bn", dropout=0.1, shiny_option=3)
    dm = import_adapterhub(_base(FIXTURES, "seq_bn"), folder, ignore_fields=["dropout", "shiny_option"]).eval()
    inputs = {k: expected[k] for k in ("input_ids", "attention_mask")}
    assert (dm(**inputs).logits - expected["seq_bn"]).abs().max().item() <= TOL


def test_a_mismatched_backbone_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterHubFormatError, match="saved from a bert model .*this is roberta"):
        import_adapterhub(_base(FIXTURES, "roberta_lora"), FIXTURES / "seq_bn")
    config = tf.AutoConfig.from_pretrained(FIXTURES / "base_bert")
    wide = tf.BertForSequenceClassification(tf.BertConfig(**(config.to_dict() | {"hidden_size": 48})))
    with pytest.raises(AdapterHubFormatError, match="hidden size 32, this one has 48"):
        import_adapterhub(wide, FIXTURES / "seq_bn")
    shallow = tf.BertForSequenceClassification(tf.BertConfig(**(config.to_dict() | {"num_hidden_layers": 1})))
    with pytest.raises(AdapterHubFormatError, match="tensors for 'bert.encoder.layer.1.output', which .* lacks"):
        import_adapterhub(shallow, FIXTURES / "seq_bn")
    deep = tf.BertForSequenceClassification(tf.BertConfig(**(config.to_dict() | {"num_hidden_layers": 3})))
    with pytest.raises(AdapterHubFormatError, match=r"cover layers \[0, 1\], .* a 3-layer model has the adapter on"):
        import_adapterhub(deep, FIXTURES / "lora")


def test_a_bin_file_is_read_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.load

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    import_adapterhub(_base(FIXTURES, "seq_bn_bin"), FIXTURES / "seq_bn_bin")
    assert calls and all(c is True for c in calls)


class _Payload:
    def __reduce__(self):  # noqa: ANN204 - what a hostile pickle does: run code when loaded
        return (Path.touch, (Path(self.flag),))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path: Path) -> None:
    folder = _copy(tmp_path, "seq_bn_bin")
    payload = _Payload()
    payload.flag = str(tmp_path / "ran")
    torch.save({"x": payload}, folder / "pytorch_adapter.bin")
    with pytest.raises(AdapterHubFormatError, match="pytorch_adapter.bin is not a plain tensor file"):
        import_adapterhub(_base(FIXTURES, "seq_bn_bin"), folder)
    assert not (tmp_path / "ran").exists()


def test_folders_that_are_not_an_importable_adapterhub_adapter(tmp_path: Path) -> None:
    model = _base(FIXTURES, "seq_bn")
    folder = _copy(tmp_path, "seq_bn")
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(AdapterHubFormatError, match="neither adapter.safetensors nor pytorch_adapter.bin"):
        import_adapterhub(model, folder)
    with pytest.raises(AdapterHubFormatError, match="has no adapter_config.json"):
        import_adapterhub(model, tmp_path)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterHubFormatError, match="is a PEFT adapter: load it with .*import_peft"):
        import_adapterhub(model, tmp_path / "peft")
    fusion = _copy(tmp_path, "lora")
    (fusion / "adapter_fusion_config.json").write_text("{}")
    with pytest.raises(AdapterHubFormatError, match="AdapterFusion"):
        import_adapterhub(model, fusion)
    odd = _copy(tmp_path, "double_seq_bn")
    tensors = load_file(str(odd / "adapter.safetensors"))
    key = next(k for k in tensors if "adapter_up.weight" in k)
    save_file({**tensors, key.replace("adapter_up", "gate"): tensors[key].clone()}, str(odd / "adapter.safetensors"))
    with pytest.raises(AdapterHubFormatError, match="a bottleneck tensor deltatune does not know"):
        import_adapterhub(model, odd)
    del tensors[key]  # a block without its up-projection would stay at zero: refused
    save_file(tensors, str(odd / "adapter.safetensors"))
    with pytest.raises(AdapterHubFormatError, match="lacks up.weight"):
        import_adapterhub(model, odd)


def test_the_import_is_a_delta_like_any_other(tmp_path: Path) -> None:
    """Saved with deltatune and loaded back: the same outputs; only the delta (and head) train."""
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    inputs = {k: expected[k] for k in ("input_ids", "attention_mask")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = import_adapterhub(_base(FIXTURES, "seq_bn"), FIXTURES / "seq_bn", name="pfeiffer").eval()
    dm.save_pretrained(tmp_path / "saved")
    again = dt.DeltaModel.from_pretrained(_base(FIXTURES, "seq_bn"), tmp_path / "saved").eval()
    with torch.no_grad():
        assert (again(**inputs).logits - expected["seq_bn"]).abs().max().item() <= TOL
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(".pfeiffer." in n or "classifier" in n or n.startswith("deltas.") for n in trainable)


def test_adapterhub_folders_are_pointed_to_the_importer(tmp_path: Path) -> None:
    with pytest.raises(deltatune.interop.PeftFormatError, match="import_adapterhub"):
        deltatune.interop.import_peft(_base(FIXTURES, "seq_bn"), FIXTURES / "seq_bn")
    with pytest.raises(dt.DeltaIOError, match="import_adapterhub"):
        dt.DeltaModel.from_pretrained(_base(FIXTURES, "seq_bn"), FIXTURES / "seq_bn")


def test_live_flexible_head_model_onto_a_bare_encoder(tmp_path: Path) -> None:
    """AutoAdapterModel (keys under bert., a flexible head) onto a BertModel: same hidden states, head left out."""
    adapters = pytest.importorskip("adapters")
    model = adapters.AutoAdapterModel.from_pretrained(FIXTURES / "base_bert").eval()
    model.add_adapter("x", config="seq_bn")
    model.add_classification_head("x", num_labels=3)
    model.set_active_adapters("x")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".x." in n:
                p.add_(torch.randn(p.shape, generator=g))
        ids = torch.randint(3, 100, (2, 7), generator=g)
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    model.save_adapter(str(tmp_path / "x"), "x", use_safetensors=True)
    with pytest.warns(UserWarning, match="flexible head \\(classification\\)"):
        dm = import_adapterhub(tf.BertModel.from_pretrained(FIXTURES / "base_bert").eval(), tmp_path / "x")
    with torch.no_grad():
        assert (dm(input_ids=ids).last_hidden_state - want).abs().max().item() <= TOL


# transformers' GELU variants, which AdapterHub runs by name (ACT2FN), -> the bottleneck activation computing each
GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
         "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh", "GELU_New": "gelu_tanh", "gelu_python": "gelu"}  # fmt: skip


@pytest.mark.parametrize("act", sorted(GELUS))
def test_gelu_variants_import_as_the_function_adapterhub_runs(tmp_path: Path, act: str) -> None:
    """AdapterHub lower-cases the name and takes transformers' ACT2FN: the same function as deltatune's gelu_tanh
    (gelu: the exact GELU) up to float32 rounding (float64: <= 9e-13); the tanh and exact GELU differ by 4.7e-4."""
    from transformers.activations import ACT2FN

    from deltatune.methods.bottleneck import activation

    folder = _edit(tmp_path, "double_seq_bn", non_linearity=act)
    dm = import_adapterhub(_base(FIXTURES, "double_seq_bn"), folder)
    assert dm.delta("double_seq_bn").config.non_linearity == GELUS[act]
    x = torch.linspace(-12, 12, 20001)
    with torch.no_grad():
        assert (ACT2FN[act.lower()](x) - activation(GELUS[act])(x)).abs().max().item() <= 1e-6  # float32 ulps
        other = "gelu" if GELUS[act] == "gelu_tanh" else "gelu_tanh"
        assert (ACT2FN[act.lower()](x) - activation(other)(x)).abs().max().item() > 4e-4


def test_live_gelu_variants_give_adapterhubs_logits(tmp_path: Path) -> None:
    """Each variant named in the fixtures' double_seq_bn and seq_bn folders, loaded by AdapterHub and imported."""
    adapters = pytest.importorskip("adapters")
    inputs = {
        k: v
        for k, v in load_file(str(FIXTURES / "expected.safetensors")).items()
        if k in ("input_ids", "attention_mask")
    }
    diffs = {}
    for case in ("double_seq_bn", "seq_bn"):
        for act in GELUS:
            folder = _edit(tmp_path / f"{case}-{act}", case, non_linearity=act)
            theirs = _base(FIXTURES, case)
            adapters.init(theirs)
            theirs.set_active_adapters(theirs.load_adapter(str(folder), use_safetensors=True))
            dm = import_adapterhub(_base(FIXTURES, case), folder).eval()
            with torch.no_grad():
                diffs[case, act] = (dm(**inputs).logits - theirs.eval()(**inputs).logits).abs().max().item()
    print("LIVE gelu variants, max |logit diff|:", {f"{c} {a}": f"{d:.2g}" for (c, a), d in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
