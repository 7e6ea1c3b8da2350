"""A DeltaModel under a plain `transformers.Trainer` with default arguments: trains, checkpoints
only the delta and the head, resumes to the same tensors as an uninterrupted run."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, make_model

import deltatune as dt
from deltatune.core.delta import DeltaError
from deltatune.train.hf import SaveDeltaCallback, optimizer, param_groups
from deltatune.train.trainer import TrainConfig

transformers = pytest.importorskip("transformers")


class Rows(torch.utils.data.Dataset):
    """Rows as a tokenized dataset has them: extra columns Trainer must drop, the label as `label`."""

    def __init__(self, n: int = 8, seq: int = 6) -> None:
        g = torch.Generator().manual_seed(3)
        self.rows = [
            {
                "input_ids": torch.randint(3, VOCAB, (seq,), generator=g),
                "attention_mask": torch.ones(seq, dtype=torch.long),
                "label": int(i % 3),
                "sentence": f"text {i}",
                "idx": i,
            }
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _dm(method: str = "lora") -> dt.DeltaModel:
    model = make_model("bert").train()
    return dt.attach(model, dt.METHODS[method](), train_head=True)


def _args(out: Path, **kwargs: object) -> transformers.TrainingArguments:
    defaults = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, use_cpu=True, report_to=[])
    return transformers.TrainingArguments(**(defaults | kwargs))


def _trained(dm: dt.DeltaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dm.state_dict().items()}


def test_default_arguments_train_the_delta_not_the_backbone(tmp_path: Path) -> None:
    dm = _dm()
    frozen = {k: v.clone() for k, v in dm.backbone.state_dict().items() if "classifier" not in k}
    before = _trained(dm)
    trainer = transformers.Trainer(model=dm, args=_args(tmp_path), train_dataset=Rows())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = _trained(dm)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".B" in k), "LoRA's B never moved"
    assert all(torch.equal(v, dm.backbone.state_dict()[k]) for k, v in frozen.items())


def test_labels_reach_evaluation(tmp_path: Path) -> None:
    dm = _dm()
    trainer = transformers.Trainer(model=dm, args=_args(tmp_path), eval_dataset=Rows(4))
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics  # loss is only computed when Trainer found the labels


def test_checkpoints_hold_only_the_delta_and_the_head(tmp_path: Path) -> None:
    dm = _dm()
    transformers.Trainer(model=dm, args=_args(tmp_path, save_steps=2), train_dataset=Rows()).train()
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert set(saved) == set(dm.state_dict())
    assert {k for k in saved if k.startswith("backbone.")} == {"backbone.classifier.weight", "backbone.classifier.bias"}
    delta_and_head = sum(v.numel() for v in saved.values())
    assert delta_and_head == dm.trainable_parameters() < sum(p.numel() for p in dm.parameters()) / 10


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_resume_from_checkpoint_reaches_the_uninterrupted_tensors(method: str, tmp_path: Path) -> None:
    def run(out: Path, resume: str | None = None, steps: int = 6) -> dict[str, torch.Tensor]:
        dm = _dm(method)  # same seed: the same backbone and initial delta
        args = _args(out, max_steps=steps, save_steps=3, seed=11)
        transformers.Trainer(model=dm, args=args, train_dataset=Rows()).train(resume_from_checkpoint=resume)
        return _trained(dm)

    uninterrupted = run(tmp_path / "a")
    resumed = run(tmp_path / "c", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    halfway = load_file(str(tmp_path / "a" / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(halfway[k], uninterrupted[k]) for k in halfway), "the resumed run did not train"


def test_per_method_learning_rates_through_trainer(tmp_path: Path) -> None:
    dm = _dm("lora")
    dm.add("bits", dt.METHODS["bitfit"]())
    groups = param_groups(dm)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("default", dt.METHODS["lora"].default_lr),
        ("bits", dt.METHODS["bitfit"].default_lr),
        ("head", TrainConfig().head_lr),  # `deltatune train`'s: 1e-3 left a new head at the majority class
    ]
    opt = optimizer(dm)
    trainer = transformers.Trainer(
        model=dm,
        args=_args(tmp_path, max_steps=2, lr_scheduler_type="constant"),
        train_dataset=Rows(),
        optimizers=(opt, None),
    )
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in groups]


def test_save_delta_callback_writes_deltatune_folders(tmp_path: Path) -> None:
    dm = _dm()
    transformers.Trainer(
        model=dm, args=_args(tmp_path, save_steps=4), train_dataset=Rows(), callbacks=[SaveDeltaCallback()]
    ).train()
    loaded = dt.DeltaModel.from_pretrained(make_model("bert"), tmp_path / "checkpoint-4" / "delta")
    mine = dm.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items())


def test_load_best_model_at_end_restores_a_delta_checkpoint(tmp_path: Path) -> None:
    dm = _dm()
    scores = iter([1.0, 0.0])  # the first evaluation (step 2) is the best one
    args = _args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
    )
    trainer = transformers.Trainer(
        model=dm,
        args=args,
        train_dataset=Rows(),
        eval_dataset=Rows(4),
        compute_metrics=lambda _: {"score": next(scores)},
    )
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    mine = dm.state_dict()
    assert any(not torch.equal(best[k], last[k]) for k in best)
    assert all(torch.equal(best[k], mine[k]) for k in best)


def test_the_loss_a_trainer_sees_carries_the_deltas_regularization() -> None:
    """Diff pruning's L0 penalty and AdaLoRA's orthogonality reach any loop that trains on outputs.loss."""
    for method in ("diff_pruning", "adalora"):
        dm = _dm(method)
        batch = {"input_ids": torch.randint(3, VOCAB, (2, 6)), "labels": torch.tensor([0, 1])}
        extra = dm.regularization()
        assert extra is not None and extra.requires_grad and extra.item() > 0
        torch.manual_seed(0)
        with_term = dm(**batch).loss
        torch.manual_seed(0)
        plain = dm.backbone(**batch).loss
        torch.testing.assert_close(with_term, plain + extra)
        dm.eval()
        with torch.no_grad():
            assert dm.regularization() is None
            torch.testing.assert_close(dm(**batch).loss, dm.backbone(**batch).loss)


def test_adalora_under_trainer_allocates_ranks_with_the_schedule_callback(tmp_path: Path) -> None:
    from deltatune.train.hf import DeltaScheduleCallback

    dm = dt.attach(make_model("bert").train(), dt.METHODS["adalora"](init_r=4, target_r=1, tfinal=2), train_head=True)
    args = _args(tmp_path, max_steps=6, learning_rate=1e-2, save_strategy="no")
    transformers.Trainer(model=dm, args=args, train_dataset=Rows(), callbacks=[DeltaScheduleCallback()]).train()
    ranks = dm.delta().ranks()
    assert sum(ranks.values()) == len(ranks)  # target_r=1 per layer on average, from init_r=4


def test_the_schedule_callback_finalizes_what_trained_when_training_ends(tmp_path: Path) -> None:
    """`fit` finalizes its deltas; under Trainer nothing did: a diff-pruning delta was saved dense (100% of its
    entries non-zero where 0.5% were asked for, its gates still in the file)."""
    from deltatune.train.hf import DeltaScheduleCallback

    dm = dt.attach(make_model("bert").train(), dt.METHODS["diff_pruning"](sparsity=0.99), train_head=True)
    args = _args(tmp_path, max_steps=2, learning_rate=1e-2, save_strategy="no")
    transformers.Trainer(model=dm, args=args, train_dataset=Rows(), callbacks=[DeltaScheduleCallback()]).train()
    delta = dm.delta()
    assert delta.finalized == {"mode": "magnitude"} and not any("log_alpha" in k for k in dm.delta_state_dict())
    diff = torch.cat([v.flatten() for k, v in dm.delta_state_dict().items()])
    assert 0 < float((diff != 0).float().mean()) <= 0.0101


def test_resuming_adalora_under_trainer_continues_its_schedule_exactly(tmp_path: Path) -> None:
    """AdaLoRA's importance averages live outside the parameters: Trainer's checkpoints did not hold them, and a
    resumed run kept other ranks than an uninterrupted one (1e-2 off, no error). The callback writes them beside
    each checkpoint and puts them back; a checkpoint written without it says that the schedule starts over."""
    from deltatune.train.hf import DeltaScheduleCallback

    TARGETS = ("attn.q", "attn.k", "attn.v", "ffn.in")  # noqa: N806

    def trainer(out: Path, callbacks: list) -> transformers.Trainer:
        torch.manual_seed(0)
        config = dt.METHODS["adalora"](init_r=8, target_r=2, tinit=2, tfinal=4, delta_t=1, targets=TARGETS)
        dm = dt.attach(make_model("bert").train(), config)
        args = _args(out, max_steps=16, learning_rate=1e-2, save_strategy="steps", save_steps=8, seed=5)
        return transformers.Trainer(model=dm, args=args, train_dataset=Rows(32), callbacks=callbacks)

    whole = trainer(tmp_path / "a", [DeltaScheduleCallback()])
    whole.train()
    assert (tmp_path / "a" / "checkpoint-8" / "deltatune_schedule.safetensors").is_file()
    resumed = trainer(tmp_path / "b", [DeltaScheduleCallback()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    expected = _trained(whole.model)
    assert all(torch.equal(v, expected[k]) for k, v in _trained(resumed.model).items())
    trainer(tmp_path / "c", []).train()  # checkpoints without the callback
    with pytest.warns(UserWarning, match=r"resuming at step 8: the checkpoint holds no training schedule"):
        trainer(tmp_path / "d", [DeltaScheduleCallback()]).train(
            resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-8")
        )


def test_adalora_trained_without_its_schedule_warns(tmp_path: Path) -> None:
    dm = dt.attach(make_model("bert").train(), dt.METHODS["adalora"](init_r=4, target_r=1), train_head=True)
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 6)), "labels": torch.tensor([0, 1])}
    with pytest.warns(UserWarning, match="DeltaScheduleCallback"):
        for _ in range(100):
            dm(**batch)


def test_trainer_given_the_backbone_warns_that_no_delta_trains(tmp_path: Path) -> None:
    # Trainer(model=backbone): the optimizer held the head alone, LoRA never moved, the run "succeeded"
    model = make_model("bert").train()
    dm = dt.attach(model, dt.METHODS["lora"](), train_head=True)
    before = _trained(dm)
    args = _args(tmp_path, max_steps=101, disable_tqdm=True)
    with (
        pytest.warns(UserWarning, match=r"no optimizer step changed it.*Trainer\(model=dm\), not the backbone"),
        pytest.raises(DeltaError, match="save_pretrained of this model would write it without its deltas"),
    ):  # and its checkpoint (the backbone's save_pretrained) would have dropped them: refused (core.marks)
        transformers.Trainer(model=model, args=args, train_dataset=Rows()).train()
    assert all(torch.equal(before[k], v) for k, v in _trained(dm).items() if k.startswith("deltas."))
    with warnings.catch_warnings():  # the DeltaModel itself, with accumulation: steps reset the count
        warnings.simplefilter("error")
        args = _args(tmp_path / "dm", max_steps=101, gradient_accumulation_steps=2, disable_tqdm=True)
        transformers.Trainer(model=_dm(), args=args, train_dataset=Rows()).train()


@pytest.mark.parametrize("strict", [False, True])
def test_a_state_of_deltas_under_other_names_is_refused_naming_both(strict: bool) -> None:
    """Trainer's `resume_from_checkpoint` loads without `strict`: a model whose LoRA was added as "lora" resumed
    a checkpoint of "default" with a fresh delta beside the checkpoint's optimizer state, and only transformers'
    log of missing and unexpected keys."""
    saved = _dm("lora").state_dict()
    dm = dt.DeltaModel(make_model("bert").train())
    dm.add("lora", dt.get_config("lora"), train_head=True)
    with pytest.raises(DeltaError, match=r"the state holds delta 'default' and nothing of this model's delta 'lora'"):
        dm.load_state_dict(saved, strict=strict)
