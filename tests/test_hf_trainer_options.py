"""`transformers.Trainer` options an ML engineer turns on, with a DeltaModel (several deltas, a causal LM).

test_hf_trainer.py covers the defaults (columns, delta-sized checkpoints, resume to the same tensors);
here each option is held to what it promises for a plain model: the best step's outputs come back,
a resumed run logs the uninterrupted run's losses, checkpointing and accumulation change no update,
bf16 autocast trains the fp32 delta, evaluation and prediction see the deltas, and the folder
`save_model` writes is named for what it is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, make_model

import deltatune as dt

transformers = pytest.importorskip("transformers")
PROBE = {"input_ids": torch.tensor([[3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 12, 14]])}


class Rows(torch.utils.data.Dataset):
    """Tokenized rows: a class label (`label`) for a classifier, next-token labels for a causal LM."""

    def __init__(self, n: int = 8, lm: bool = False, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            ids = torch.randint(3, VOCAB, (6,), generator=g)
            row = {"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long)}
            labels = ids.clone()
            labels[: i % 4] = -100  # rows of 6, 5, 4, 3 scored tokens: a per-row or per-batch mean is not per token
            row |= {"labels": labels} if lm else {"label": i % 3}
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _dm(kind: str, several: bool = False) -> dt.DeltaModel:
    """LoRA on a tiny BERT classifier or Llama LM, in training mode; `several` adds BitFit and a prompt."""
    model = make_model("bert") if kind == "cls" else make_model("llama", "lm")
    dm = dt.attach(model.train(), "lora")
    if several:
        dm.add("bits", "bitfit")
        dm.add("prompt", "prompt")
    return dm


def _args(out: Path, **kwargs: object) -> transformers.TrainingArguments:
    defaults = dict(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2, use_cpu=True,
        report_to=[], disable_tqdm=True, logging_steps=1, save_strategy="no", seed=11,
    )  # fmt: skip
    return transformers.TrainingArguments(**(defaults | kwargs))


def _state(dm: dt.DeltaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in dm.state_dict().items()}


def _outputs(dm: dt.DeltaModel) -> torch.Tensor:
    """The logits in fp32 through the backbone (the deltas act in its hooks): a Trainer leaves the DeltaModel's
    `forward` wrapped in accelerate's autocast, and with transformers 4.57 a bf16 run's autocast reaches the
    next Trainer of the process (0.0017 on these logits), as for any model."""
    was = dm.training
    dm.eval()
    with torch.no_grad():
        out = dm.backbone(**PROBE).logits.clone()
    dm.train(was)
    return out


def _losses(trainer: transformers.Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize(("kind", "several"), [("cls", True), ("lm", False)])
def test_load_best_model_at_end_gives_the_best_steps_outputs(kind: str, several: bool, tmp_path: Path) -> None:
    """The best checkpoint is loaded with `load_state_dict(strict=False)`: every delta must act as at that step."""
    dm = _dm(kind, several)
    seen: dict[int, torch.Tensor] = {}

    class Snapshot(transformers.TrainerCallback):
        def on_evaluate(self, args: object, state: object, control: object, **kwargs: object) -> None:
            seen[state.global_step] = _outputs(dm)

    scores = iter([0.0, 1.0, 0.5])  # the evaluation at step 4 is the best
    args = _args(
        tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="score",
    )  # fmt: skip
    lm = kind == "lm"
    transformers.Trainer(
        model=dm, args=args, train_dataset=Rows(lm=lm), eval_dataset=Rows(4, lm=lm),
        compute_metrics=lambda _: {"score": next(scores)}, callbacks=[Snapshot()],
    ).train()  # fmt: skip
    assert not torch.equal(seen[4], seen[6]), "the last steps did not train"
    torch.testing.assert_close(_outputs(dm), seen[4], rtol=0, atol=0)


def test_resume_logs_the_uninterrupted_losses_with_several_deltas_and_accumulation(tmp_path: Path) -> None:
    def run(out: Path, resume: str | None = None) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
        dm = _dm("lm", several=True)
        args = _args(out, max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
        trainer = transformers.Trainer(model=dm, args=args, train_dataset=Rows(lm=True))
        trainer.train(resume_from_checkpoint=resume)
        return _losses(trainer), _state(dm)

    losses, state = run(tmp_path / "a")
    resumed_losses, resumed_state = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert sorted(resumed_losses) == sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(resumed_losses[s] == losses[s] for s in (4, 5, 6)), (losses, resumed_losses)  # trained after resuming
    assert all(torch.equal(resumed_state[k], state[k]) for k in state)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(("kind", "method"), [("lm", "lora"), ("lm", "prefix"), ("cls", "lora")])
def test_gradient_checkpointing_trains_to_the_same_tensors(
    kind: str, method: str, reentrant: bool, tmp_path: Path
) -> None:
    """Reentrant checkpointing (transformers 4.x's default) gives a layer's output no gradient when its inputs
    need none, as a frozen backbone's embeddings do: on 4.57.6 the classifier's LoRA never moved (the head
    alone trained, no error) and the LM's backward failed. Every delta must train to the tensors of a run
    without checkpointing (`core.checkpointing`)."""

    def run(**kwargs: object) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
        model = (make_model("llama", "lm") if kind == "lm" else make_model("bert")).train()
        frozen = {k: v.clone() for k, v in model.state_dict().items() if "classifier" not in k}
        dm = dt.attach(model, method)
        before = _state(dm)
        rows = Rows(lm=kind == "lm")
        transformers.Trainer(model=dm, args=_args(tmp_path, max_steps=3, **kwargs), train_dataset=rows).train()
        assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)
        assert all(not torch.equal(before[k], v) for k, v in _state(dm).items()), "a delta tensor did not train"
        return _state(dm), model

    plain, _ = run()
    checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: gradient_checkpointing -> activation_...
        checkpointed, model = run(**checkpointing)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert all(torch.equal(checkpointed[k], plain[k]) for k in plain)


@pytest.mark.skipif(
    not hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"), reason="transformers >= 5.25"
)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_of_every_other_layer_trains_to_the_same_tensors(
    reentrant: bool, tmp_path: Path
) -> None:
    """transformers 5.25 renamed gradient checkpointing `activation_checkpointing` and checkpoints every n-th layer
    on request: the deltas of the checkpointed and of the plain layers train as without it."""

    def run(**kwargs: object) -> dict[str, torch.Tensor]:
        model = make_model("llama", "lm").train()
        dm = dt.attach(model, "lora")
        transformers.Trainer(model=dm, args=_args(tmp_path, max_steps=3, **kwargs), train_dataset=Rows(lm=True)).train()
        flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert (True in flags) == bool(kwargs) and (False in flags or not kwargs), flags
        return _state(dm)

    plain = run()
    kwargs = {"use_reentrant": reentrant, "every_n_layers": 2}
    checkpointed = run(activation_checkpointing=True, activation_checkpointing_kwargs=kwargs)
    assert all(torch.equal(checkpointed[k], plain[k]) for k in plain)


def test_gradient_accumulation_matches_one_batch_of_the_same_rows(tmp_path: Path) -> None:
    """A causal LM takes Trainer's `num_items_in_batch` through the DeltaModel's advertised **kwargs, so two
    accumulated halves are one batch: the same updates. Plain SGD, so that a gradient off by a factor shows
    (a loss averaged per half, over 11 and 7 scored tokens, would be)."""
    states = {}
    for accumulate, batch in ((1, 4), (2, 2)):
        dm = _dm("lm", several=True)
        args = _args(
            tmp_path, max_steps=2, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
            optim="sgd", learning_rate=0.5,
        )  # fmt: skip
        trainer = transformers.Trainer(model=dm, args=args, train_dataset=Rows(lm=True))
        assert trainer.model_accepts_loss_kwargs
        trainer.train()
        states[accumulate] = _state(dm)
    for k, v in states[1].items():
        torch.testing.assert_close(states[2][k], v, rtol=0, atol=1e-6)


def test_bf16_on_cpu_trains_the_fp32_deltas_and_checkpoints_them_in_fp32(tmp_path: Path) -> None:
    dm = _dm("cls", several=True)
    frozen = {k: v.clone() for k, v in dm.backbone.state_dict().items() if "classifier" not in k}
    before = _state(dm)
    args = _args(tmp_path, bf16=True, save_strategy="steps", save_steps=4)
    transformers.Trainer(model=dm, args=args, train_dataset=Rows()).train()
    after = _state(dm)
    assert all(not torch.equal(before[k], after[k]) for k in before), "a delta or head tensor did not train"
    assert {v.dtype for v in after.values()} == {torch.float32}
    saved = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert all(torch.equal(v, dm.backbone.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("kind", ["cls", "lm"])
def test_evaluate_and_predict_see_the_deltas(kind: str, tmp_path: Path) -> None:
    dm = _dm(kind, several=True)
    dev = Rows(4, lm=kind == "lm", seed=5)
    got = {}

    def metrics(p: transformers.EvalPrediction) -> dict[str, float]:
        got["predictions"] = p.predictions
        return {"rows": float(len(p.label_ids))}

    args = _args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = transformers.Trainer(model=dm, args=args, train_dataset=Rows(lm=kind == "lm"), eval_dataset=dev,
                                   compute_metrics=metrics)  # fmt: skip
    trainer.train()
    assert trainer.evaluate()["eval_rows"] == 4.0
    batch = {k: torch.stack([r[k] for r in dev.rows]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = dm.eval()(**batch).logits.numpy()
    assert (got["predictions"] == expected).all()
    assert (trainer.predict(dev).predictions == expected).all()


def test_the_folder_save_model_writes_is_named_with_the_calls_that_read_it(tmp_path: Path) -> None:
    """`Trainer.save_model` writes a DeltaModel's state dict (no configs): both folder loaders say what to do,
    and the state loads back into the DeltaModel built as for training with equal outputs."""
    dm = _dm("lm", several=True)
    trainer = transformers.Trainer(model=dm, args=_args(tmp_path), train_dataset=Rows(lm=True))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for load in (dt.DeltaModel.from_pretrained, dt.load_delta):
        with pytest.raises(
            dt.DeltaIOError, match=r"Trainer.save_model.*load_state_dict.*dm\.save_pretrained\(folder\)"
        ):
            load(make_model("llama", "lm"), tmp_path / "final")
    fresh = _dm("lm", several=True)
    fresh.load_state_dict(load_file(str(tmp_path / "final" / "model.safetensors")))
    torch.testing.assert_close(_outputs(fresh), _outputs(dm), rtol=0, atol=0)
