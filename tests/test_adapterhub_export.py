"""deltatune deltas exported as AdapterHub (`adapters` library) folders: what the real library wrote, exactly.

Without `adapters` (CI: it does not support transformers 5.x) the export is checked against the folders
adapters 1.3.0 wrote (tests/fixtures/adapterhub/, scripts/make_adapterhub_fixtures.py): an imported
fixture exports to the same bytes, a natively attached delta to the same config and tensor names, and an
export imports back to the same outputs. Where `adapters` is installed, `model.load_adapter` loads each
export and its logits are compared with deltatune's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import deltatune as dt
from deltatune.interop import AdapterHubFormatError, export_adapterhub, import_adapterhub

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
TOL = 1e-5
SAFE = ["seq_bn", "seq_bn_mh_leave_out", "double_seq_bn", "houlsby_ffn_only", "par_bn", "lora", "ia3",
        "roberta_seq_bn", "roberta_lora", "roberta_double_seq_bn"]  # fmt: skip
BIN = ["seq_bn_bin", "double_seq_bn_bin", "lora_all_bin", "ia3_bin"]
# deltatune configs on the fixture bases (hidden 32, 2 layers): each AdapterHub form, odd widths, leave_out
CASES = {
    "norm_adapter": ("bert", "norm_adapter", {"bottleneck": 2}),
    "norm_adapter_ffn_layer1": ("bert", "norm_adapter", {"targets": (r"re:.*\d\.output\.LayerNorm",), "layers": [1],
                                                         "bottleneck": 3, "non_linearity": "gelu", "scaling": 0.5}),
    "adapter_houlsby": ("bert", "adapter", {"bottleneck": 2, "non_linearity": "silu"}),
    "adapter_gelu_tanh": ("bert", "adapter", {"bottleneck": 4, "non_linearity": "gelu_tanh"}),  # as "gelu_new"
    "norm_adapter_gelu_tanh": ("bert", "norm_adapter", {"bottleneck": 3, "non_linearity": "gelu_tanh"}),
    "adapter_pfeiffer": ("bert", "adapter", {"placement": "pfeiffer", "layers": [0], "bottleneck": 5,
                                             "non_linearity": "tanh", "scaling": 2.0}),
    "parallel_adapter": ("bert", "parallel_adapter", {"bottleneck": 16}),
    "lora": ("bert", "lora", {"r": 8, "alpha": 8}),
    "lora_all": ("bert", "lora", {"targets": ("attn.q", "attn.k", "attn.v", "ffn.in", "ffn.out"), "layers": [1],
                                  "r": 4, "alpha": 12.5, "dropout": 0.1}),
    "ia3": ("bert", "ia3", {"targets": ("attn.k", "attn.v", "ffn.in"), "feedforward": ()}),
    "ia3_out": ("bert", "ia3", {"targets": ("attn.q", "ffn.out"), "feedforward": (), "layers": [0]}),
    "roberta_norm_adapter": ("roberta", "norm_adapter", {"bottleneck": 4}),
    "roberta_adapter": ("roberta", "adapter", {"bottleneck": 2}),
    "roberta_parallel_adapter": ("roberta", "parallel_adapter", {"bottleneck": 7, "scaling": 1.5}),
    "roberta_lora": ("roberta", "lora", {"targets": ("attn.v", "ffn.out"), "r": 2, "alpha": 4}),
    "roberta_ia3": ("roberta", "ia3", {"targets": ("attn.k", "attn.v", "ffn.in"), "feedforward": ()}),
}  # fmt: skip


def _base(arch: str) -> torch.nn.Module:
    return tf.AutoModelForSequenceClassification.from_pretrained(FIXTURES / f"base_{arch}").eval()


def _inputs() -> dict[str, torch.Tensor]:
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    return {k: expected[k] for k in ("input_ids", "attention_mask")}


def _attached(case: str, model: torch.nn.Module | None = None) -> dt.DeltaModel:
    """The case's delta on the fixture base, every delta tensor and the head perturbed (up-projections start at 0)."""
    arch, method, settings = CASES[case]
    model = _base(arch) if model is None else model
    torch.manual_seed(0)  # the delta's own init (down-projections, LoRA's A): the same numbers in any test order
    dm = dt.DeltaModel(model).add(case, dt.get_config(method, **settings), train_head=True).eval()
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    with torch.no_grad():
        for n, p in dm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if "classifier" in n else 1.0))
    return dm


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).logits


@pytest.mark.parametrize("case", SAFE)
def test_an_imported_adapterhub_folder_exports_to_the_same_bytes(tmp_path: Path, case: str) -> None:
    """adapter_config.json, adapter.safetensors, head_config.json and model_head.safetensors as adapters wrote them."""
    dm = import_adapterhub(_base("roberta" if case.startswith("roberta") else "bert"), FIXTURES / case)
    dm.backbone.config._name_or_path = json.loads((FIXTURES / case / "adapter_config.json").read_text())["model_name"]
    export_adapterhub(dm, tmp_path / case, case)
    written = sorted(p.name for p in (tmp_path / case).iterdir())
    assert written == sorted(p.name for p in (FIXTURES / case).iterdir())
    for file in written:
        assert (tmp_path / case / file).read_bytes() == (FIXTURES / case / file).read_bytes(), file


@pytest.mark.parametrize("case", BIN)
def test_an_imported_pickle_folder_exports_the_same_config_and_tensors_as_safetensors(
    tmp_path: Path, case: str
) -> None:
    dm = import_adapterhub(_base("bert"), FIXTURES / case)
    export_adapterhub(dm, tmp_path / case, case)
    ours, theirs = (json.loads((f / "adapter_config.json").read_text()) for f in (tmp_path / case, FIXTURES / case))
    saved = torch.load(FIXTURES / case / "pytorch_adapter.bin", weights_only=True)
    written = load_file(str(tmp_path / case / "adapter.safetensors"))
    assert sorted(written) == sorted(saved)
    if case == "ia3_bin":  # alpha 2 is folded into the vector, as deltatune holds it: out * (1 * 2l)
        assert ours["config"].pop("alpha") == 1 and theirs["config"].pop("alpha") == 2
        saved = {k: v * 2 for k, v in saved.items()}
    assert ours["config"] == theirs["config"]
    assert all(torch.equal(written[k], saved[k]) for k in saved)
    assert not any(p.suffix == ".bin" for p in (tmp_path / case).iterdir())  # safetensors only, never a pickle


NATIVE = {  # a delta attached in deltatune with AdapterHub's preset settings -> the fixture adapters wrote for it
    "seq_bn": ("norm_adapter", {"targets": (r"re:.*layer\.\d+\.output\.LayerNorm",), "bottleneck": 2}),
    "double_seq_bn": ("adapter", {"bottleneck": 2, "non_linearity": "silu"}),
    "par_bn": ("parallel_adapter", {"bottleneck": 16}),
    "lora": ("lora", {"r": 8, "alpha": 8}),
    "ia3": ("ia3", {"targets": ("attn.k", "attn.v", "ffn.in"), "feedforward": ()}),
}


@pytest.mark.parametrize("case", sorted(NATIVE))
def test_a_native_delta_writes_adapterhubs_config_and_tensor_names(tmp_path: Path, case: str) -> None:
    method, settings = NATIVE[case]
    dm = dt.DeltaModel(_base("bert")).add(case, dt.get_config(method, **settings))
    export_adapterhub(dm, tmp_path / case, case)
    ours, theirs = (json.loads((f / "adapter_config.json").read_text()) for f in (tmp_path / case, FIXTURES / case))
    assert {k: v for k, v in ours.items() if k != "model_name"} == {
        k: v for k, v in theirs.items() if k != "model_name"
    }
    written, saved = (load_file(str(f / "adapter.safetensors")) for f in (tmp_path / case, FIXTURES / case))
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in saved.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_export_imports_back_to_the_same_outputs(tmp_path: Path, case: str) -> None:
    dm = _attached(case)
    export_adapterhub(dm, tmp_path / "ah", case)
    again = import_adapterhub(_base(CASES[case][0]), tmp_path / "ah").eval()
    assert [d.config.method for d in again.deltas.values()] == [CASES[case][1]]
    assert (_logits(again) - _logits(dm)).abs().max().item() == 0.0
    again.disable(case)  # the export matters: without it the outputs are far off
    assert (_logits(again) - _logits(dm)).abs().max().item() > 1e-3


def test_a_bottleneck_width_that_does_not_divide_the_hidden_size_gets_a_float_reduction_factor(tmp_path: Path) -> None:
    export_adapterhub(_attached("adapter_pfeiffer"), tmp_path / "ah", "adapter_pfeiffer")  # 32 / 5
    config = json.loads((tmp_path / "ah" / "adapter_config.json").read_text())["config"]
    assert isinstance(config["reduction_factor"], float) and int(32 // config["reduction_factor"]) == 5
    assert config["leave_out"] == [1] and not config["mh_adapter"] and config["output_adapter"]


def test_a_bare_encoder_exports_without_a_head(tmp_path: Path) -> None:
    bare = tf.BertModel.from_pretrained(FIXTURES / "base_bert", add_pooling_layer=False).eval()
    dm = dt.DeltaModel(bare).add("x", dt.get_config("norm_adapter", bottleneck=2))
    export_adapterhub(dm, tmp_path / "ah", "x")
    assert sorted(p.name for p in (tmp_path / "ah").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert all(k.startswith("encoder.layer.") for k in load_file(str(tmp_path / "ah" / "adapter.safetensors")))
    with torch.no_grad():
        want = dm(**_inputs()).last_hidden_state
        again = import_adapterhub(
            tf.BertModel.from_pretrained(FIXTURES / "base_bert", add_pooling_layer=False), tmp_path / "ah"
        )
        assert (again.eval()(**_inputs()).last_hidden_state - want).abs().max().item() == 0.0


def _distilbert() -> torch.nn.Module:
    config = tf.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
    )
    return tf.DistilBertForSequenceClassification(config)


REFUSED = [
    ("bitfit", {}, "bert", r"bitfit has no AdapterHub equivalent; exportable: norm_adapter \(seq_bn\), adapter"),
    ("prefix", {"num_tokens": 2}, "bert", r"prefix has no AdapterHub equivalent"),
    ("lora", {}, "distilbert", r"writes bert/roberta adapters .*on a distilbert model: use export_peft or save_delta"),
    ("lora", {"targets": ("attn.o",)}, "bert", r"sits on 'bert.encoder.layer.0.attention.output.dense', where "
     r"AdapterHub has no LoRA; it has one on bert.encoder.layer.<i>.\{attention.self.query, "),
    ("adapter", {"targets": ("attn.q",)}, "bert", r"where AdapterHub has no sequential bottleneck; it has one on "
     r".*attention.output.dense, output.dense"),
    ("norm_adapter", {"targets": ("embeddings.LayerNorm",), "layers": None}, "bert", r"sits on "
     r"'bert.embeddings.LayerNorm', where AdapterHub has no seq_bn"),
    ("adapter", {"targets": ("bert.encoder.layer.0.attention.output.dense", "ffn.out")}, "bert",
     r"mh_adapter on layers \[0\]; output_adapter on layers \[0, 1\], but AdapterHub's bottleneck adapter takes one "
     r"leave_out for every location"),
    ("lora", {"targets": ("attn.q", "bert.encoder.layer.1.attention.self.value")}, "bert",
     r"q \(selfattn_lora\) on layers \[0, 1\]; v \(selfattn_lora\) on layers \[1\]"),
    ("lora", {"rank_pattern": {"query": 4}}, "bert", r"several \(r, alpha\) .*one r and one alpha: attach it without "
     r"rank_pattern/alpha_pattern"),
    ("ia3", {}, "bert", r"scales the input of 'bert.encoder.layer.0.output.dense' \(feedforward\); AdapterHub's "
     r"\(IA\)\^3 scales outputs only: attach it with feedforward=\(\)"),
    ("parallel_adapter", {"input_from": ("attn.o",)}, "bert", r"reads 'bert.encoder.layer.0.attention.output.dense''s "
     r"input; AdapterHub's par_bn reads the FFN's input"),
    ("parallel_adapter", {"targets": ("attn.o",), "input_from": ("attn.q",)}, "bert", r"where AdapterHub has no "
     r"par_bn; it has one on bert.encoder.layer.<i>.\{output.dense\}"),
]  # fmt: skip


@pytest.mark.parametrize("method,settings,arch,match", REFUSED, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(REFUSED)])
def test_what_adapterhub_cannot_express_is_refused_in_one_line(
    tmp_path: Path, method: str, settings: dict, arch: str, match: str
) -> None:
    model = _distilbert() if arch == "distilbert" else _base(arch)
    dm = dt.DeltaModel(model).add("x", dt.get_config(method, **settings))
    with pytest.raises(AdapterHubFormatError, match=match) as err:
        export_adapterhub(dm, tmp_path / "ah", "x")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ah").exists() and not list(tmp_path.iterdir())


def test_a_head_with_a_tied_weight_is_refused_unless_left_out(tmp_path: Path) -> None:
    """BertForMaskedLM's decoder is the word embeddings: AdapterHub would save it as head; include_head=False."""
    config = tf.AutoConfig.from_pretrained(FIXTURES / "base_bert")
    dm = dt.DeltaModel(tf.BertForMaskedLM(config)).add("x", dt.get_config("lora"))
    with pytest.raises(AdapterHubFormatError, match=r"'cls\.predictions\.decoder\.\w+' with the head, .*include_head"):
        export_adapterhub(dm, tmp_path / "ah", "x")
    export_adapterhub(dm, tmp_path / "ah", "x", include_head=False)
    assert sorted(p.name for p in (tmp_path / "ah").iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_a_merged_delta_exports_the_same_folder(tmp_path: Path) -> None:
    dm = _attached("lora_all")
    export_adapterhub(dm, tmp_path / "unmerged", "lora_all")
    dm.merge("lora_all")
    export_adapterhub(dm, tmp_path / "merged", "lora_all")
    for file in ("adapter_config.json", "adapter.safetensors", "model_head.safetensors"):
        assert (tmp_path / "merged" / file).read_bytes() == (tmp_path / "unmerged" / file).read_bytes()


def test_a_folder_holding_other_files_is_refused_and_an_old_adapter_is_replaced_whole(tmp_path: Path) -> None:
    dm = _attached("lora")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds other files; choose a new folder"):
        export_adapterhub(dm, tmp_path / "mine", "lora")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"stale": torch.zeros(1)}, old / "pytorch_adapter.bin")  # load_adapter() would read this pickle
    export_adapterhub(dm, old, "lora")
    assert sorted(p.name for p in old.iterdir()) == sorted(
        ["adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors"]
    )


def test_a_failure_midway_leaves_no_folder_and_the_old_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    dm, calls, real = _attached("adapter_houlsby"), [], safetensors.torch.save_file

    def failing(tensors, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(path)
        if len(calls) == 2:  # the adapter is written, the head is not: a full disk
            raise OSError("No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        export_adapterhub(dm, tmp_path / "ah", "adapter_houlsby")
    assert not list(tmp_path.iterdir())  # neither the folder nor a temporary one
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    export_adapterhub(dm, tmp_path / "ah", "adapter_houlsby")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ah").iterdir()}
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError):
        export_adapterhub(_attached("adapter_houlsby"), tmp_path / "ah", "adapter_houlsby")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ah").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ah"]


# -- live: AdapterHub's own loader on the exports (adapters pins transformers 4.57; skipped elsewhere) --------------


def _adapterhub_model(arch: str, folder: Path, bare: bool = False) -> torch.nn.Module:
    adapters = pytest.importorskip("adapters")
    if bare:
        model = tf.BertModel.from_pretrained(FIXTURES / "base_bert", add_pooling_layer=False).eval()
    else:
        model = _base(arch)
    adapters.init(model)
    name = model.load_adapter(str(folder), use_safetensors=True)
    model.set_active_adapters(name)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_live_adapterhub_loads_the_export_with_deltatunes_logits(tmp_path: Path, case: str) -> None:
    pytest.importorskip("adapters")
    dm = _attached(case)
    export_adapterhub(dm, tmp_path / "ah", case)
    theirs = _adapterhub_model(CASES[case][0], tmp_path / "ah")
    diff = (_logits(theirs) - _logits(dm)).abs().max().item()
    print(f"LIVE {case}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    theirs.set_active_adapters(None)  # the adapter matters in AdapterHub too
    assert (_logits(theirs) - _logits(dm)).abs().max().item() > 1e-3


def test_live_a_bare_encoders_export_loads_into_a_bare_adapterhub_encoder(tmp_path: Path) -> None:
    pytest.importorskip("adapters")
    bare = tf.BertModel.from_pretrained(FIXTURES / "base_bert", add_pooling_layer=False).eval()
    dm = _attached("norm_adapter", model=bare)
    export_adapterhub(dm, tmp_path / "ah", "norm_adapter")
    theirs = _adapterhub_model("bert", tmp_path / "ah", bare=True)
    with torch.no_grad():
        diff = (theirs(**_inputs()).last_hidden_state - dm(**_inputs()).last_hidden_state).abs().max().item()
    print(f"LIVE bare norm_adapter: max |hidden diff| = {diff:.3g}")
    assert diff <= TOL


def test_live_load_adapter_without_use_safetensors_fails_loudly(tmp_path: Path) -> None:
    """adapters 1.3.0 reads only pytorch_adapter.bin unless asked: the export (no pickles) is refused, not misread."""
    adapters = pytest.importorskip("adapters")
    export_adapterhub(_attached("lora"), tmp_path / "ah", "lora")
    model = _base("bert")
    adapters.init(model)
    with pytest.raises(OSError, match="Unable to load weights"):
        model.load_adapter(str(tmp_path / "ah"))


def test_gelu_tanh_is_written_as_gelu_new(tmp_path: Path) -> None:
    """AdapterHub runs transformers' "gelu_new" for it (the tanh approximation; its configs' name for it)."""
    export_adapterhub(_attached("adapter_gelu_tanh"), tmp_path / "ah", "adapter_gelu_tanh")
    assert json.loads((tmp_path / "ah" / "adapter_config.json").read_text())["config"]["non_linearity"] == "gelu_new"
