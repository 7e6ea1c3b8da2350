"""OpenDelta delta checkpoints imported with OpenDelta's outputs, and what is refused.

tests/fixtures/opendelta/ comes from scripts/make_opendelta_fixtures.py run with OpenDelta 0.3.2
(transformers 4.57.6): tiny random BERT/GPT-2/T5 bases, one perturbed `save_finetuned` folder per case
and OpenDelta's outputs on fixed inputs. OpenDelta is not installed here (nor in CI).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import deltatune.interop
from deltatune.interop import OpenDeltaFormatError, import_opendelta

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "opendelta"
sys.path.insert(0, str(ROOT / "scripts"))
from make_opendelta_fixtures import CASES, CONFIGS  # noqa: E402

METHOD = {
    "lora": "lora", "lora_names": "lora", "lora_unfrozen": "lora", "t5_lora": "lora",
    "adapter": "adapter", "adapter_relu": "adapter", "gpt2_adapter": "adapter", "t5_adapter": "adapter",
    "bitfit": "bitfit", "gpt2_bitfit": "bitfit", "low_rank_adapter": "lowrank_adapter",
    "parallel_adapter": "parallel_adapter",
    "soft_prompt": "prompt", "gpt2_soft_prompt": "prompt", "t5_soft_prompt": "prompt",
}  # fmt: skip
REFUSED = {"parallel_adapter_attn": "BertAttention"}
TOL = 1e-5
EXPECTED = load_file(str(FIXTURES / "expected.safetensors"))


def _base(arch: str) -> torch.nn.Module:
    cls, kwargs = CONFIGS[arch]
    model_cls = getattr(tf, cls)
    model = model_cls(model_cls.config_class(**kwargs))
    model.load_state_dict(load_file(str(FIXTURES / f"base_{arch}.safetensors")), strict=False)
    model.tie_weights()  # GPT-2's and T5's output embeddings are their input embeddings
    return model.eval()


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    prefix = f"{arch}.input."
    return {k[len(prefix) :]: v for k, v in EXPECTED.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", sorted(METHOD))
def test_imported_delta_gives_opendeltas_outputs(case: str) -> None:
    arch = CASES[case][0]
    dm = import_opendelta(_base(arch), FIXTURES / case).eval()
    assert [d.config.method for d in dm.deltas.values()] == [METHOD[case]]
    want = _real(EXPECTED[case], dm)
    with torch.no_grad():
        assert (dm(**_inputs(arch)).logits - want).abs().max().item() <= TOL
        dm.disable("default")  # the delta matters: without it the outputs are far from OpenDelta's
        assert (dm(**_inputs(arch)).logits - want).abs().max().item() > 1e-3


def _real(logits: torch.Tensor, dm: torch.nn.Module) -> torch.Tensor:
    """OpenDelta's outputs at the real tokens: its soft prompt's LM logits also cover the prompt positions."""
    n = next((d.config.num_tokens for d in dm.deltas.values() if d.config.method == "prompt"), 0)
    return logits[:, n:] if n and logits.dim() == 3 and not dm.config.is_encoder_decoder else logits


def test_every_fixture_is_checked() -> None:
    assert set(CASES) == set(METHOD) | set(REFUSED)
    assert {k for k in EXPECTED if "." not in k} == set(CASES)


def test_saved_classifier_is_copied_and_trains() -> None:
    dm = import_opendelta(_base("bert"), FIXTURES / "lora")
    saved = torch.load(FIXTURES / "lora" / "pytorch_model.bin", weights_only=True, map_location="cpu")
    assert torch.equal(dm.backbone.classifier.weight, saved["classifier.weight"])
    assert dm.backbone.classifier.weight.requires_grad and not dm.backbone.bert.pooler.dense.weight.requires_grad


def test_delta_onto_the_bare_encoder_leaves_the_head_out() -> None:
    arch_cls, kwargs = CONFIGS["bert"]
    bare = tf.BertModel(tf.BertConfig(**kwargs)).eval()
    bare.load_state_dict({k.removeprefix("bert."): v for k, v in load_file(str(FIXTURES / "base_bert.safetensors")).items()
                          if k.startswith("bert.")})  # fmt: skip
    with pytest.warns(UserWarning, match="task head .* not imported"):
        dm = import_opendelta(bare, FIXTURES / "adapter")
    assert list(dm.deltas) == ["default"] and dm.delta("default").sites


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unmappable_deltas_are_refused(case: str) -> None:
    with pytest.raises(OpenDeltaFormatError, match=REFUSED[case]):
        import_opendelta(_base(CASES[case][0]), FIXTURES / case)


def _edited(tmp_path: Path, case: str, config: dict | None = None, tensors: dict | None = None) -> Path:
    folder = tmp_path / case
    shutil.copytree(FIXTURES / case, folder)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text()) | config))
    if tensors is not None:
        (folder / "pytorch_model.bin").unlink()
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"delta_type": "compacter"}, "Compacter"),
        ({"delta_type": "prefix"}, "prefix tuning"),
        ({"delta_type": "lora_plus"}, "'lora_plus' has no deltatune mapping"),
        ({"backbone_class": "GPT2LMHeadModel"}, r"saved from a GPT2LMHeadModel \(gpt2\)"),
        ({"non_linearity": "leakyrelu"}, "non_linearity='leakyrelu'"),
    ],
)
def test_config_refusals(tmp_path: Path, edit: dict, message: str) -> None:
    case = "adapter" if "non_linearity" in edit else "lora"
    with pytest.raises(OpenDeltaFormatError, match=message):
        import_opendelta(_base("bert"), _edited(tmp_path, case, edit))


def test_not_an_opendelta_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))  # a transformers model folder
    with pytest.raises(OpenDeltaFormatError, match="not an OpenDelta delta checkpoint"):
        import_opendelta(_base("bert"), tmp_path)


def test_tensors_the_model_lacks_or_another_backbone(tmp_path: Path) -> None:
    saved = torch.load(FIXTURES / "lora" / "pytorch_model.bin", weights_only=True, map_location="cpu")
    deeper = saved | {"bert.encoder.layer.5.attention.self.query.lora.lora_A": torch.zeros(4, 32)}
    with pytest.raises(OpenDeltaFormatError, match="layer.5.attention.self.query', which BertFor.* lacks"):
        import_opendelta(_base("bert"), _edited(tmp_path, "lora", tensors=deeper))
    model = _base("bert")
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.add_(0.01)  # another checkpoint of the architecture
    with pytest.raises(OpenDeltaFormatError, match="values other than this model's"):
        import_opendelta(model, FIXTURES / "lora_unfrozen")  # the whole backbone was saved: it is compared
    wider = saved | {k: torch.zeros(8, 32) for k in saved if k.endswith("lora_A")}
    with pytest.raises(OpenDeltaFormatError, match="not of rank lora_r=4"):
        import_opendelta(_base("bert"), _edited(tmp_path / "w", "lora", tensors=wider))
    base = _base("bert")
    with torch.no_grad():  # on this machine's kernels: the fixture's numbers match to float precision only
        before = base(**_inputs("bert")).logits
    assert torch.allclose(before, EXPECTED["bert.base"], atol=1e-6)
    narrow = saved | {"bert.encoder.layer.1.attention.self.value.lora.lora_B": torch.zeros(16, 4)}
    with pytest.raises(OpenDeltaFormatError, match=r"shape \(16, 4\), this model needs \(32, 4\)"):
        import_opendelta(base, _edited(tmp_path / "n", "lora", tensors=narrow))  # attached, then detached
    with torch.no_grad():
        assert torch.equal(base(**_inputs("bert")).logits, before)


def test_low_rank_above_one_is_refused(tmp_path: Path) -> None:
    saved = torch.load(FIXTURES / "low_rank_adapter" / "pytorch_model.bin", weights_only=True, map_location="cpu")
    ranked = {k: (torch.zeros(v.shape[0], 2) if k.endswith("W_left") else v) for k, v in saved.items()}
    with pytest.raises(OpenDeltaFormatError, match="elementwise"):
        import_opendelta(_base("bert"), _edited(tmp_path, "low_rank_adapter", tensors=ranked))


def test_exported_next_to_peft_and_adapterhub() -> None:
    assert deltatune.interop.import_opendelta is import_opendelta


@pytest.mark.parametrize(("case", "arch"), [("soft_prompt", "bert"), ("gpt2_soft_prompt", "gpt2")])
def test_soft_prompt_numbers_positions_as_opendelta(case: str, arch: str) -> None:
    """OpenDelta lets the model number [prompt; text] from 0: positions="shift"; "keep" computes other outputs."""
    dm = import_opendelta(_base(arch), FIXTURES / case).eval()
    assert dm.delta("default").config.positions == "shift"
    keep = import_opendelta(_base(arch), FIXTURES / case).eval()
    keep.delta("default").config.positions = "keep"
    with torch.no_grad():
        assert (keep(**_inputs(arch)).logits - _real(EXPECTED[case], dm)).abs().max().item() > 1e-4


@pytest.mark.parametrize(
    ("case", "arch"), [("soft_prompt", "bert"), ("gpt2_soft_prompt", "gpt2"), ("t5_soft_prompt", "t5")]
)
def test_soft_prompt_without_a_mask_differs_where_the_input_holds_id_0(case: str, arch: str) -> None:
    """With no attention_mask OpenDelta masks every id 0 (input_ids != 0); deltatune, as the backbone, attends to
    all tokens. Row 0 holds no 0 and agrees; row 1 is padded with 0 and differs."""
    dm = import_opendelta(_base(arch), FIXTURES / case).eval()
    inputs = {k: v for k, v in _inputs(arch).items() if k != "attention_mask"}
    assert (inputs["input_ids"][0] != 0).all() and (inputs["input_ids"][1] == 0).any()
    with torch.no_grad():
        diff = (dm(**inputs).logits - _real(EXPECTED[f"{case}.no_mask"], dm)).abs().flatten(1).amax(1)
    assert diff[0] <= TOL and diff[1] > 1e-4


def test_soft_prompt_onto_a_classifier_reading_a_position_is_refused() -> None:
    """GPT-2's classifier reads the last position in OpenDelta (it passes no input_ids), deltatune's the last real
    token; BERT's pooler (the first prompt vector in both) imports exactly (above)."""
    cls, kwargs = CONFIGS["gpt2"]
    model = tf.GPT2ForSequenceClassification(tf.GPT2Config(**kwargs))
    with pytest.raises(OpenDeltaFormatError, match="hands GPT2ForSequenceClassification's classifier the prompt"):
        import_opendelta(model, FIXTURES / "gpt2_soft_prompt")


def test_deltatune_loaders_name_import_opendelta_for_an_opendelta_folder() -> None:
    """`load_delta` / `DeltaModel.from_pretrained` on OpenDelta's folder said only "no delta.json"."""
    import deltatune as dt

    folder = FIXTURES / "lora"
    with pytest.raises(
        dt.DeltaIOError, match=r"OpenDelta checkpoint: load it with deltatune\.interop\.import_opendelta"
    ):
        dt.load_delta(_base("bert"), folder)
    with pytest.raises(
        dt.DeltaIOError, match=r"OpenDelta checkpoint: load it with deltatune\.interop\.import_opendelta"
    ):
        dt.DeltaModel.from_pretrained(_base("bert"), folder)
