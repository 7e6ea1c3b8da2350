"""A PEFT + Trainer classification script runs unchanged with deltatune in the line that builds the model.

`train_script` is written as a PEFT user writes it (a tokenized dataset with extra columns, default
TrainingArguments, Trainer's own optimizer at one learning rate); only `MODEL_LINES` differs. The
head of a classification model is new for the task, so both must train it: PEFT through SEQ_CLS's
modules_to_save, deltatune through attach's train_head="auto".
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, make_config, make_model

import deltatune as dt

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

MODEL_LINES = {
    "peft": lambda model: peft.get_peft_model(
        model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=["query", "value"])
    ),
    "deltatune": lambda model: dt.attach(model, dt.LoRAConfig(r=8, alpha=8)),
}


class Rows(torch.utils.data.Dataset):
    """A learnable task (the first token names the label) with the columns a dataset has."""

    def __init__(self, n: int = 32, seq: int = 6) -> None:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(10, VOCAB, (n, seq), generator=g)
        labels = torch.arange(n) % 3
        ids[:, 0] = 3 + labels
        self.rows = [
            {"input_ids": x, "attention_mask": torch.ones(seq, dtype=torch.long), "label": int(y), "idx": i}
            for i, (x, y) in enumerate(zip(ids, labels, strict=True))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def train_script(library: str, out: Path, max_steps: int = 40, resume: str | None = None) -> tuple:
    """The user's script: build the model (the one line that differs), train with Trainer, evaluate."""
    base = make_model("bert").train()
    model = MODEL_LINES[library](base)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=max_steps,
        learning_rate=3e-2,
        save_steps=20,
        seed=11,
        use_cpu=True,
        report_to=[],
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows())
    before = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=resume)
    return model, base, before, trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("library", list(MODEL_LINES))
def test_the_same_trainer_script_learns_and_checkpoints_delta_sized(library: str, tmp_path: Path) -> None:
    initial_head = make_model("bert").classifier.weight.detach().clone()
    model, base, before, after = train_script(library, tmp_path)
    assert after < 0.7 * before, f"{library}: eval loss {before:.3f} -> {after:.3f}"
    assert not torch.equal(base.classifier.weight if library == "deltatune" else _peft_head(model), initial_head)
    checkpoint = tmp_path / "checkpoint-40"
    weights = checkpoint / ("model.safetensors" if library == "deltatune" else "adapter_model.safetensors")
    full = sum(p.numel() * p.element_size() for p in make_model("bert").parameters())
    assert weights.stat().st_size < full / 5, f"{library}: the checkpoint holds more than the delta and head"


def _peft_head(model: torch.nn.Module) -> torch.Tensor:
    """PEFT trains a copy of the head (modules_to_save); the original stays frozen."""
    return dict(model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]


def test_deltatune_checkpoint_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    whole, _, _, _ = train_script("deltatune", tmp_path / "a")
    resumed, _, _, _ = train_script("deltatune", tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-20"))
    a, b = whole.state_dict(), resumed.state_dict()
    assert "backbone.classifier.weight" in a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_head_auto_trains_new_task_heads_only() -> None:
    cls = dt.attach(make_model("bert"), dt.LoRAConfig())
    assert cls.train_head and cls.backbone.classifier.weight.requires_grad
    lm = dt.attach(make_model("gpt2", "lm"), dt.LoRAConfig())  # a pretrained (tied) LM head stays frozen
    assert not lm.train_head and not any(p.requires_grad for p in lm.backbone.parameters())
    bare = dt.attach(make_model("bert").base_model, dt.LoRAConfig())
    assert not bare.train_head
    chosen = dt.attach(make_model("bert"), dt.LoRAConfig(), train_head=False)
    assert not chosen.backbone.classifier.weight.requires_grad
    dt.attach(chosen, dt.METHODS["bitfit"](), name="bits")  # "auto" on a DeltaModel keeps the choice made
    assert not chosen.train_head
    with pytest.raises(TypeError, match="train_head must be True, False or 'auto'"):
        dt.attach(make_model("bert"), dt.LoRAConfig(), train_head="yes")


def test_train_head_auto_trains_the_qa_head_of_t5_too() -> None:
    # T5ForQuestionAnswering keeps its stacks at the top (no `transformer` child): its new qa_outputs was
    # left frozen and random, so a QA script trained its delta against a random head without a word
    model = transformers.T5ForQuestionAnswering(make_config("t5"))
    dm = dt.attach(model, dt.LoRAConfig())
    assert dm.train_head and dm.backbone.qa_outputs.weight.requires_grad
    assert "__head__.qa_outputs.weight" in dm.head_state_dict()
    assert not any(p.requires_grad for n, p in dm.backbone.named_parameters() if not n.startswith("qa_outputs."))


def test_a_peft_model_is_refused_with_the_way_over() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("bert"), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    with pytest.raises(TypeError, match=r"this is a PEFT PeftModelForSequenceClassification: .*import_peft"):
        dt.attach(model, dt.LoRAConfig())
    # the model inside it, with PEFT's layers injected: BitFit attached, PEFT's LoRA acting (frozen) in the outputs
    # and left out of the saves, silently; LoRA was refused as "a Linear ..., not a linear layer"
    for config in (dt.BitFitConfig(), dt.LoRAConfig()):
        with pytest.raises(
            TypeError, match=r"carries PEFT layers \(bert\.encoder\.layer\.0\.attention\.self\.query is a peft"
        ):
            dt.attach(model.base_model.model, config)


def test_a_model_with_adapterhub_adapters_added_is_refused() -> None:
    """`adapters.init(model); model.add_adapter("a", ...)`: the adapter acted in the outputs, left out of the
    deltas' saves. The check reads AdapterHub's `adapters_config.adapters`; `adapters` itself pins transformers
    4.57, so the live half runs where it is installed."""
    model = make_model("bert")
    model.adapters_config = types.SimpleNamespace(adapters={"sentiment": "seq_bn"})
    with pytest.raises(TypeError, match=r"carries AdapterHub adapters \('sentiment'\).*delete_adapter"):
        dt.attach(model, dt.BitFitConfig())
    adapters = pytest.importorskip("adapters")
    live = make_model("bert")
    adapters.init(live)
    dt.attach(live, dt.BitFitConfig()).detach()  # ready for adapters, none added: nothing acts unseen
    live.add_adapter("a", config="seq_bn")
    with pytest.raises(TypeError, match=r"carries AdapterHub adapters \('a'\)"):
        dt.attach(live, dt.BitFitConfig())


def test_a_trained_head_is_saved_and_loaded_with_the_delta(tmp_path: Path) -> None:
    dm = dt.attach(make_model("bert"), dt.LoRAConfig())
    with torch.no_grad():
        dm.backbone.classifier.weight.add_(1.0)
    dm.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path)
    assert loaded.train_head
    assert torch.equal(loaded.backbone.classifier.weight, dm.backbone.classifier.weight)
