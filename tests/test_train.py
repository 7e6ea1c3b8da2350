"""The training loop and the CLI end to end, on tiny models with a word-level tokenizer, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import NOUNS, TOY_WORDS, make_tokenizer
from tiny import tiny_bert as _bert
from tiny import write_toy_task as _write_task

import deltatune as dt
from deltatune.data import load_task
from deltatune.train import TrainConfig, fit

WORDS = TOY_WORDS


def _write_generation_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 32), ("dev", 6)):
        rows = [{"source": f"name {w}", "target": f"eat {w} food"} for w in (NOUNS * 8)[:n]]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def _llama(tokenizer) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=2,
    )
    return tf.LlamaForCausalLM(config)


@pytest.fixture
def task(tmp_path: Path):  # noqa: ANN201
    return load_task(_write_task(tmp_path / "toy"))


@pytest.fixture
def tokenizer():  # noqa: ANN201
    return make_tokenizer(WORDS)


FAST = {"epochs": 12, "batch_size": 16, "eval_every": 8, "max_length": 16, "progress": False}


def test_lora_learns_a_separable_task(task, tokenizer) -> None:  # noqa: ANN001
    model, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], TrainConfig(lr=2e-2, **FAST))
    assert result.best["accuracy"] >= 0.9
    assert result.mode == "lora" and isinstance(model, dt.DeltaModel)
    assert result.trainable_parameters == model.delta_parameters() + 32 * 2 + 2


def test_the_same_seed_gives_the_same_curve(task, tokenizer) -> None:  # noqa: ANN001
    runs = [fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], TrainConfig(**FAST))[1] for _ in range(2)]
    strip = [[{k: v for k, v in row.items() if k != "elapsed"} for row in r.history] for r in runs]
    assert strip[0] == strip[1]


def test_divergence_stops_with_a_message_and_keeps_finite_parameters(task, tokenizer) -> None:  # noqa: ANN001
    model, result = fit(
        _bert(tokenizer),
        tokenizer,
        task,
        [dt.METHODS["lora"]()],
        TrainConfig(lr=1e35, head_lr=1e35, grad_clip=1e30, **FAST),
    )
    assert result.diverged is not None and "lower the learning rate" in result.diverged
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_head_only_baseline_trains_just_the_classifier(task, tokenizer) -> None:  # noqa: ANN001
    bert = _bert(tokenizer)
    body = {n: p.detach().clone() for n, p in bert.bert.named_parameters()}
    model, result = fit(bert, tokenizer, task, [], TrainConfig(**FAST))
    assert result.mode == "head" and result.trainable_parameters == 32 * 2 + 2
    assert all(torch.equal(p, body[n]) for n, p in bert.bert.named_parameters())


def test_full_fine_tuning_trains_every_weight(task, tokenizer) -> None:  # noqa: ANN001
    bert = _bert(tokenizer)
    _, result = fit(bert, tokenizer, task, [], TrainConfig(**FAST), full_finetune=True)
    assert result.mode == "full" and result.trainable_parameters == sum(p.numel() for p in bert.parameters())
    with pytest.raises(ValueError, match="drop the delta methods"):
        fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], TrainConfig(**FAST), full_finetune=True)


def test_early_stopping_ends_before_the_budget(task, tokenizer) -> None:  # noqa: ANN001
    cfg = TrainConfig(lr=1e-2, patience=2, min_steps=0, **(FAST | {"eval_every": 2, "epochs": 40}))
    _, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], cfg)
    assert result.steps < 40 * 4 and len(result.history) >= 3


def test_combined_methods_get_their_own_learning_rates(task, tokenizer) -> None:  # noqa: ANN001
    methods = {"lora": dt.METHODS["lora"](), "bitfit": dt.METHODS["bitfit"]()}
    model, result = fit(_bert(tokenizer), tokenizer, task, methods, TrainConfig(**(FAST | {"epochs": 1})))
    assert result.mode == "lora+bitfit" and set(model.deltas) == {"lora", "bitfit"}


def test_diff_pruning_is_pruned_to_its_target_sparsity_when_training_ends(task, tokenizer) -> None:  # noqa: ANN001
    config = dt.METHODS["diff_pruning"](sparsity=0.9)
    model, _ = fit(_bert(tokenizer), tokenizer, task, [config], TrainConfig(**(FAST | {"epochs": 2})))
    assert model.delta("diff_pruning").sparsity() >= 0.9 - 1e-3


def test_a_causal_lm_classifies_through_label_words(task, tokenizer) -> None:  # noqa: ANN001
    _, result = fit(_llama(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], TrainConfig(lr=1e-2, **FAST))
    assert result.best["accuracy"] >= 0.75


def test_label_words_follow_the_answer_cue_of_a_text_longer_than_max_length(tokenizer) -> None:  # noqa: ANN001
    from deltatune.data import Example, Task
    from deltatune.train import objective_for

    task = Task("t", "classification", ["negative", "positive"])
    objective = objective_for(task, tokenizer, lm=True, max_length=6)
    long, short = Example(" ".join(["the film was"] * 5), None, 1), Example("dull", None, 0)
    batch = objective.collate([long, short])
    answer = tokenizer.convert_tokens_to_ids("Answer:")
    # right truncation kept "the film was the film was" and dropped "Answer:" (the label word's cue)
    assert batch["input_ids"][0].tolist() == tokenizer("the film was the film Answer:")["input_ids"]
    assert batch["input_ids"][1, :2].tolist() == [tokenizer.convert_tokens_to_ids("dull"), answer]
    assert batch["attention_mask"].sum(1).tolist() == [6, 2] and batch["labels"].tolist() == [1, 0]


def test_a_generation_source_longer_than_max_length_is_cut_not_its_target(tokenizer) -> None:  # noqa: ANN001
    """Cutting source + target at the end left a long source's row without a target token: a batch of
    such rows gave a NaN loss (the run stopped as diverged) and taught nothing."""
    from deltatune.data import Example, Task
    from deltatune.train import objective_for

    objective = objective_for(Task("g", "generation", None), tokenizer, lm=True, max_length=8)
    long = Example(" ".join(["the film was"] * 5), None, "the film")
    batch = objective.collate([long, long])
    target = tokenizer("the film", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    source = tokenizer(long.text, add_special_tokens=False)["input_ids"]
    assert batch["labels"][0].tolist() == [-100] * 5 + target
    assert batch["input_ids"][0].tolist() == source[:4] + source[-1:] + target
    model = _llama(tokenizer)
    assert torch.isfinite(objective.loss(model, batch))
    seen = []
    real = model.generate
    model.generate = lambda **kw: seen.append(kw["input_ids"]) or real(**kw)
    objective.max_new_tokens = 4
    with pytest.warns(UserWarning, match="1 of 2 sources are longer than 8 tokens and are cut"):
        objective.generate(model, [long, Example("dull", None, "x")])
    # at inference a source is kept up to max_length, as training keeps it with its target (cut to
    # max_length - max_new_tokens before: 14% of WebNLG's test sources lost triples at 128/48), and said
    assert seen[0][0].tolist() == source[:7] + source[-1:]
    assert seen[0][1].tolist()[-1] == tokenizer.convert_tokens_to_ids("dull")


def test_a_causal_lm_learns_a_generation_task(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    gen = load_task(_write_generation_task(tmp_path / "gen"))
    cfg = TrainConfig(lr=5e-2, max_new_tokens=4, **(FAST | {"epochs": 20, "eval_every": 10}))
    _, result = fit(
        _llama(tokenizer), tokenizer, gen, [dt.METHODS["lora"](targets=("attn.q", "attn.v", "ffn.out"))], cfg
    )
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert set(result.best) == {"bleu", "rouge_l"}
    assert result.best["rouge_l"] >= 80 > result.history[0]["rouge_l"]


def test_cli_train_eval_predict_round_trip(tmp_path: Path, tokenizer, capsys) -> None:  # noqa: ANN001
    from deltatune.cli import main

    model_dir = tmp_path / "tiny-bert"
    _bert(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    task_dir = _write_task(tmp_path / "toy")
    out = tmp_path / "run"
    args = [
        "--model",
        str(model_dir),
        "--task",
        str(task_dir),
        "--lr",
        "0.02",
        "--epochs",
        "12",
        "--batch-size",
        "16",
        "--eval-every",
        "8",
        "--max-length",
        "16",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(["train", *args]) == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "delta-lora" / "delta.safetensors").exists() and result["best"]["accuracy"] >= 0.9
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(result["history"])
    assert main(["eval", "--model", str(model_dir), "--task", str(task_dir), "--delta", str(out / "delta-lora")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (
        main(
            [
                "predict",
                "--model",
                str(model_dir),
                "--delta",
                str(out / "delta-lora"),
                "the plot was great",
                "the cast was awful",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["positive", "negative"]


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from deltatune.cli import main

    assert main(["train", "--task", str(tmp_path / "missing.jsonl"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--method", "lora", "--method-arg", "rank=3"]) == 2
    assert "LoRAConfig has no setting 'rank'; deltatune calls it 'r'" in capsys.readouterr().err


def test_bf16_mixed_precision_runs_on_the_cpu(task, tokenizer) -> None:  # noqa: ANN001
    cfg = TrainConfig(lr=2e-2, mixed_precision="bf16", **(FAST | {"epochs": 2}))
    model, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], cfg)
    assert result.diverged is None and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    assert next(model.delta("lora").parameters()).dtype == torch.float32  # autocast: master weights stay fp32


def test_two_cli_runs_with_one_seed_log_the_same_metrics(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    """The backbone is saved without a classifier, so each run draws a fresh head: the seed must fix it."""
    from deltatune.cli import main

    model_dir = tmp_path / "tiny-bert-body"
    _bert(tokenizer).bert.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    task_dir = _write_task(tmp_path / "toy")
    logs = []
    for i in range(2):
        torch.manual_seed(100 + i)  # whatever the global RNG holds before the run must not matter
        args = ["--model", str(model_dir), "--task", str(task_dir), "--max-steps", "4", "--eval-every", "2"]
        assert main(["train", *args, "--batch-size", "8", "--out", str(tmp_path / f"r{i}"), "--quiet"]) == 0
        rows = [json.loads(line) for line in (tmp_path / f"r{i}" / "metrics.jsonl").read_text().splitlines()]
        logs.append([{k: v for k, v in row.items() if k != "elapsed"} for row in rows])
    assert logs[0] == logs[1] and len(logs[0]) == 2


def test_a_capped_dev_set_is_a_random_sample_not_the_first_rows() -> None:
    """Task files sorted by label would otherwise be evaluated on one class only."""
    from deltatune.train.trainer import eval_sample

    rows = [0] * 100 + [1] * 100
    sample = eval_sample(rows, 20)
    assert len(sample) == 20 and 0 < sum(sample) < 20
    assert eval_sample(rows, 20) == sample and eval_sample(rows, None) == rows


# ----------------------------------------------------------------------------- the budget: until converged

STILL = {"lr": 1e-12, "head_lr": 1e-12, "eval_every": 2, "epochs": None, "max_steps": 100}  # dev never moves


def test_patience_stops_a_plateau_and_says_why(task, tokenizer) -> None:  # noqa: ANN001
    cfg = TrainConfig(**(FAST | STILL | {"patience": 2, "min_steps": 0}))
    _, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], cfg)
    # step 2 sets the best; steps 4 and 6 do not beat it: the second of them ends the run
    assert (result.steps, result.best_step, result.stop_reason) == (6, 2, "patience")


def test_evaluations_before_min_steps_do_not_count_toward_patience(task, tokenizer) -> None:  # noqa: ANN001
    cfg = TrainConfig(**(FAST | STILL | {"patience": 2, "min_steps": 10}))
    _, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], cfg)
    assert (result.steps, result.stop_reason) == (14, "patience")  # only the evaluations at 12 and 14 count


def test_the_nearer_bound_ends_a_run_and_is_named(task, tokenizer) -> None:  # noqa: ANN001
    by_steps = TrainConfig(**(FAST | STILL | {"patience": None, "max_steps": 5, "epochs": 3}))
    _, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], by_steps)
    assert (result.steps, result.stop_reason) == (5, "max_steps")
    by_epochs = TrainConfig(**(FAST | STILL | {"patience": None, "max_steps": 50, "epochs": 1}))
    _, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], by_epochs)
    assert (result.steps, result.stop_reason) == (4, "max_epochs")  # 64 examples at batch 16
    with pytest.raises(ValueError, match="no bound"):
        fit(_bert(tokenizer), tokenizer, task, [], TrainConfig(**(FAST | {"epochs": None, "max_steps": None})))


def test_a_diverged_run_stops_for_that_reason(task, tokenizer) -> None:  # noqa: ANN001
    cfg = TrainConfig(lr=1e35, head_lr=1e35, grad_clip=1e30, **FAST)
    _, result = fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], cfg)
    assert result.stop_reason == "diverged"


def test_each_dev_evaluation_prints_one_line_with_the_best_so_far(task, tokenizer, capsys) -> None:  # noqa: ANN001
    cfg = TrainConfig(**(FAST | STILL | {"patience": None, "max_steps": 4, "progress": True}))
    fit(_bert(tokenizer), tokenizer, task, [dt.METHODS["lora"]()], cfg)
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.startswith("step ")]
    assert len(lines) == 2 and "train loss" in lines[1] and "best" in lines[1] and lines[1].startswith("step 4/4")


def test_the_majority_class_score_is_the_share_of_the_commonest_dev_label(task, tokenizer) -> None:  # noqa: ANN001
    _, result = fit(_bert(tokenizer), tokenizer, task, [], TrainConfig(**(FAST | {"max_steps": 2})))
    labels = [e.label for e in task["dev"]]
    assert result.majority["accuracy"] == pytest.approx(max(labels.count(0), labels.count(1)) / len(labels))


def test_eval_every_defaults_to_about_twice_an_epoch_and_no_more_than_the_dev_set_allows() -> None:
    from deltatune.train.trainer import auto_eval_every

    assert [auto_eval_every(n) for n in (4, 125, 1000)] == [10, 62, 200]
    assert auto_eval_every(29, dev_size=1100, batch_size=32) == 35  # a dev set's worth of examples in between


@pytest.mark.parametrize("method", ["diff_pruning", "prefix"])
def test_the_reported_dev_and_test_scores_are_the_saved_deltas(method: str, task, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    """fit finalizes (diff pruning prunes to 1%, prefix drops its MLP) before it scores, so every number it
    reports is what the saved folder scores when loaded."""
    from deltatune.train import evaluate, load_saved, objective_for

    config = dt.get_config(method, **({"sparsity": 0.99} if method == "diff_pruning" else {}))
    cfg = TrainConfig(lr=2e-2, **(FAST | {"epochs": 3}))
    _, result = fit(_bert(tokenizer), tokenizer, task, [config], cfg, output_dir=tmp_path, test_examples=task["dev"])
    saved = load_saved(_bert(tokenizer), tmp_path / f"delta-{method}")
    objective = objective_for(task, tokenizer, lm=False, max_length=cfg.max_length)
    scored = evaluate(saved, objective, task["dev"], task, cfg.eval_batch_size)
    assert result.best == scored and result.test == scored
    meta = json.loads((tmp_path / f"delta-{method}" / "delta.json").read_text())
    assert meta["metadata"]["best"] == scored
    assert meta["config"] == json.loads(
        json.dumps(config.to_dict())
    )  # the config as asked; what finalize changed is recorded beside it
    assert meta["finalized"] == ({"mode": "magnitude"} if method == "diff_pruning" else {"reparameterize": False})


def _saved(model: torch.nn.Module, tokenizer, folder: Path) -> str:  # noqa: ANN001
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_checkpoint_with_its_classes_in_another_order_has_its_head_rows_reordered_by_name(
    task, tokenizer, tmp_path: Path
) -> None:  # noqa: ANN001
    from deltatune.train.run import load_for_task

    model = _bert(tokenizer)
    model.config.id2label, model.config.label2id = {0: "positive", 1: "negative"}, {"positive": 0, "negative": 1}
    rows = model.classifier.weight.detach().clone()
    loaded, _, _ = load_for_task(_saved(model, tokenizer, tmp_path / "swapped"), task)  # task: [negative, positive]
    assert torch.equal(loaded.classifier.weight[0], rows[1]) and torch.equal(loaded.classifier.weight[1], rows[0])
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    model.config.id2label = {0: "bad", 1: "good"}
    with pytest.raises(ValueError, match=r"classifier of the classes \['bad', 'good'\] and task 'toy' has"):
        load_for_task(_saved(model, tokenizer, tmp_path / "other"), task)


def test_a_checkpoint_with_another_class_count_gets_a_new_head_with_a_notice(task, tokenizer, tmp_path, capsys) -> None:  # noqa: ANN001
    from deltatune.train.run import load_for_task

    folder = _saved(_bert(tokenizer, num_labels=3), tokenizer, tmp_path / "nli")
    loaded, _, _ = load_for_task(folder, task)
    assert loaded.classifier.weight.shape[0] == 2
    assert "is a classifier of 3 classes" in capsys.readouterr().err


def test_a_decoder_saved_as_a_classifier_trains_through_its_own_head(task, tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from deltatune.train.run import RunSpec, load_for_task, run

    torch.manual_seed(0)
    config = _llama(tokenizer).config
    config.num_labels = 2
    folder = _saved(tf.LlamaForSequenceClassification(config), tokenizer, tmp_path / "llama-cls")
    model, _, lm = load_for_task(folder, task)
    assert not lm and type(model).__name__ == "LlamaForSequenceClassification"
    score = tf.LlamaForSequenceClassification.from_pretrained(folder).score.weight
    assert torch.equal(model.score.weight, score)  # its own head, not a second one drawn
    spec = RunSpec(folder, task, {"lora": dt.LoRAConfig(r=4)}, train=TrainConfig(**FAST | {"epochs": 1}))
    trained, result, _ = run(spec)
    heads = [m for m in trained.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 2]
    assert "accuracy" in result.best and len(heads) == 1


def test_evaluating_gives_each_module_back_its_own_mode(task, tokenizer) -> None:  # noqa: ANN001
    """`evaluate` in the middle of a user's training loop: a module kept in eval mode (its dropout off) inside the
    training model came back training, as `model.train(was_training)` put every module in the top one's mode."""
    from deltatune.train import evaluate, objective_for

    dm = dt.attach(_bert(tokenizer), "lora", train_head=True).train()
    kept = dm.backbone.bert.embeddings.eval()
    before = {name: m.training for name, m in dm.named_modules()}
    objective = objective_for(task, tokenizer, lm=False, max_length=16)
    evaluate(dm, objective, task["dev"], task, 8)
    assert {name: m.training for name, m in dm.named_modules()} == before and not kept.training
