"""Tools that tell a model's family by its class name see a DeltaModel as its backbone.

transformers' Trainer shifts the labels of label smoothing only for class names of causal LMs, and its
pipelines check the class name against the task's models. A DeltaModel's class carries the backbone's
`__name__` (`core.conventions.signed_class`); before, Trainer's label smoothing on a causal LM scored
each position against its own token (loss 4.606 for 4.633 at init on tiny Llama, no error), and every
pipeline logged that the model "is not supported", listing hundreds of classes.
"""

from __future__ import annotations

import logging
import tempfile

import pytest
import torch
from tiny import TOY_WORDS, VOCAB, make_model, make_tokenizer, perturbed

import deltatune as dt

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainer_label_smoothing_shifts_a_causal_lm_delta_model_s_labels(arch: str) -> None:
    """At init (LoRA's B = 0) the DeltaModel computes the backbone's logits, so its smoothed loss is the backbone's."""
    plain, dm = make_model(arch, head="lm"), dt.attach(make_model(arch, head="lm"), dt.LoRAConfig(r=4))
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, dm):
        args = transformers.TrainingArguments(
            tempfile.mkdtemp(), label_smoothing_factor=0.1, report_to=[], use_cpu=True
        )
        trainer = transformers.Trainer(model=model, args=args)
        losses.append(trainer.compute_loss(model.eval(), {"input_ids": ids, "labels": ids.clone()}).item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_the_class_has_the_backbone_s_name_and_says_what_it_is() -> None:
    dm = dt.attach(make_model("bert"), "lora")
    assert type(dm).__name__ == dm._get_name() == "BertForSequenceClassification"
    assert type(dm).__qualname__ == "DeltaModel[BertForSequenceClassification]"
    assert repr(dm).startswith(
        "DeltaModel[BertForSequenceClassification](\n  (backbone): BertForSequenceClassification("
    )
    assert isinstance(dm, dt.DeltaModel) and not isinstance(dm, transformers.BertForSequenceClassification)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_a_text_classification_pipeline_takes_a_delta_model_silently(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    dm = perturbed(dt.attach(make_model("bert"), method))
    tok = make_tokenizer(TOY_WORDS)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        pipe = transformers.pipeline("text-classification", model=dm, tokenizer=tok, top_k=None)
        out = pipe("the movie was good")
    assert not [r for r in caplog.records if "not supported" in r.getMessage()]
    with torch.no_grad():
        probs = dm(**tok("the movie was good", return_tensors="pt")).logits.softmax(-1)[0]
    rows = out[0] if isinstance(out[0], list) else out  # one list per input in some releases
    got = {row["label"]: row["score"] for row in rows}
    assert [got[f"LABEL_{i}"] for i in range(3)] == pytest.approx(probs.tolist(), abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_a_text_generation_pipeline_generates_the_delta_model_s_tokens(
    arch: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    dm = perturbed(dt.attach(make_model(arch, head="lm"), method))
    tok = make_tokenizer(TOY_WORDS)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        pipe = transformers.pipeline("text-generation", model=dm, tokenizer=tok)
        out = pipe("the movie was", max_new_tokens=5, do_sample=False, return_tensors=True)
    assert not [r for r in caplog.records if "not supported" in r.getMessage()]
    enc = tok("the movie was", return_tensors="pt")  # the pipeline passes no token_type_ids (GPT-2 embeds them)
    direct = dm.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=5, do_sample=False)
    assert list(out[0]["generated_token_ids"]) == direct[0].tolist()
