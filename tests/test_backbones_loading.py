"""`load_backbone` on model folders made elsewhere: the dtype they were saved in, and weights they lack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import NUM_LABELS, make_model

from deltatune.backbones import load_backbone


def _saved(tmp_path: Path, **kwargs: object) -> Path:
    model = make_model("bert", **kwargs)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_a_bf16_checkpoint_loads_in_float32(tmp_path: Path) -> None:
    """transformers 5 loads a checkpoint in its saved dtype: a bf16 folder trained in bf16 throughout while
    --mixed-precision no promised float32 (full fine-tuning's AdamW steps rounded away)."""
    model = make_model("bert").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    loaded = load_backbone(str(tmp_path / "m"), "cls", NUM_LABELS)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert (
        load_backbone(str(tmp_path / "m"), "cls", NUM_LABELS, dtype=torch.bfloat16).dtype == torch.bfloat16
    )  # when asked


def test_a_peft_model_saved_without_merging_is_refused_not_loaded_with_random_weights(tmp_path: Path) -> None:
    """Its state dict names `query.base_layer.weight` and `lora_A`: transformers drew the query and value
    matrices at random, said so in a report the CLI hides, and training went on (0.74 off the base)."""
    from peft import LoraConfig, get_peft_model

    base = make_model("bert")
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    peft.base_model.model.save_pretrained(tmp_path / "m")  # the wrapped model's own save: PEFT's names inside
    with pytest.raises(ValueError, match=r"saved from a PEFT model without merging \(it holds '.*query.base_layer"):
        load_backbone(str(tmp_path / "m"), "cls", NUM_LABELS)


def test_a_checkpoint_without_some_backbone_weights_is_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    gone = sorted(k for k in weights if ".attention.self.key.weight" in k)[0]
    del weights[gone]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 backbone weights are missing from its checkpoint and would be random"):
        load_backbone(str(folder), "cls", NUM_LABELS)
    del weights["classifier.weight"], weights["classifier.bias"]  # a new task head is no missing backbone weight
    weights[gone] = make_model("bert").state_dict()[gone]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    load_backbone(str(folder), "cls", NUM_LABELS)


def test_a_model_type_without_the_head_a_task_needs_is_one_line(tmp_path: Path) -> None:
    """A Marian folder for a classification task printed transformers' list of every class it knows (3,000
    characters)."""
    import transformers as tf

    config = tf.MarianConfig(
        vocab_size=64, pad_token_id=1, decoder_start_token_id=1, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    )  # fmt: skip
    tf.MarianMTModel(config).save_pretrained(tmp_path / "marian")
    with pytest.raises(
        ValueError, match=r"is a marian model, for which transformers has no SequenceClassification"
    ) as err:
        load_backbone(str(tmp_path / "marian"), "cls")
    assert len(str(err.value)) < 300
