"""`deltatune eval`, `predict`, `inspect` and `merge` on the delta folders `deltatune train` wrote (LoRA,
head-only, pair tasks), run under the settings the delta was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from cli_helpers import _csv, _folder, _rows, _train, make_model_dir
from tiny import make_model

from deltatune.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory)


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


def test_a_lora_merge_carries_the_label_names(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    assert _train(model_dir, _folder(tmp_path / "mine"), tmp_path / "r", "--max-steps", "4", "--no-test") == 0
    assert main(["merge", str(model_dir), str(tmp_path / "r" / "delta-lora"), str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m")]) == 2  # was told to pass a folder `deltatune train` wrote
    assert "is a model folder (config.json, no delta.json): a merged model" in capsys.readouterr().err


def test_predict_on_a_pair_delta_wants_the_pair_syntax(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    task = _folder(tmp_path / "pairs", pairs=True)
    assert _train(model_dir, task, tmp_path / "r", "--max-steps", "2", "--no-test") == 0
    delta = str(tmp_path / "r" / "delta-lora")
    capsys.readouterr()
    assert main(["predict", "--delta", delta, "the plot was so very good"]) == 2
    assert "'first ||| second'" in capsys.readouterr().err
    assert main(["predict", "--delta", delta, "the plot was so very good ||| the film"]) == 0
    assert capsys.readouterr().out.split("\t")[1].strip() == "the plot was so very good ||| the film"


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
    # its output fed back in: the earlier predictions stay, the new ones get a column of their own
    again = tmp_path / "again.jsonl"
    assert (
        main(["predict", "--delta", delta, "--input", str(out), "--output", str(again), "--columns", "Review=text"])
        == 0
    )
    assert "column 'prediction_2': the rows have a 'prediction' column already" in capsys.readouterr().out
    assert [json.loads(line) for line in again.read_text().splitlines()][0] == rows[0] | {"prediction_2": printed[0]}


def test_eval_refuses_a_held_out_dev_split_of_edited_data(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """The same rows re-sorted (a spreadsheet's save): eval rebuilt another dev split, with rows the delta trained
    on, and scored it without a note (0.733 where training reported 0.700)."""
    data = _csv(tmp_path / "mine.csv")
    assert _train(model_dir, data, tmp_path / "r", "--max-steps", "4", "--dev-split", "0.25") == 0
    delta = str(tmp_path / "r" / "delta-lora")
    capsys.readouterr()
    assert main(["eval", "--delta", delta]) == 0  # the file as it was: the same split
    lines = Path(data).read_text().splitlines()
    Path(data).write_text("\n".join([lines[0], *sorted(lines[1:])]) + "\n")
    capsys.readouterr()
    assert main(["eval", "--delta", delta]) == 2
    err = capsys.readouterr().err
    assert "holds other rows (or the same in another order) than when the delta's dev split was held out" in err
    assert main(["eval", "--delta", delta, "--split", "train"]) == 2  # the train part is the same question


def test_eval_on_the_same_labels_in_another_order_scores_them_by_name(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """A file whose meta.json orders the labels otherwise was refused: "trained with labels [...] but X has [...]"."""
    assert _train(model_dir, _folder(tmp_path / "mine"), tmp_path / "r", "--max-steps", "8") == 0
    delta = str(tmp_path / "r" / "delta-lora")
    recorded = json.loads((tmp_path / "r" / "delta-lora" / "delta.json").read_text())["metadata"]["labels"]
    other = tmp_path / "other"
    other.mkdir()
    rows = (tmp_path / "mine" / "test.jsonl").read_text()
    (other / "test.jsonl").write_text(rows)
    (other / "meta.json").write_text(json.dumps({"type": "classification", "labels": list(reversed(recorded))}))
    capsys.readouterr()
    assert main(["eval", "--delta", delta, "--task", str(tmp_path / "mine"), "--split", "test"]) == 0
    same = capsys.readouterr().out
    assert main(["eval", "--delta", delta, "--task", str(other), "--split", "test"]) == 0
    score = lambda out: next(w for w in out.split() if w.replace(".", "").isdigit() and "." in w)  # noqa: E731
    assert score(capsys.readouterr().out) == score(same)


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("blank.csv", "id,text\n1,great\n2,\n", "blank.csv, line 3: 'text' is empty (a blank cell or null)"),
        ("num.jsonl", '{"text": 12}\n', "num.jsonl, line 1: field 'text' must be a string, got int 12"),
        ("cols.csv", "id,review\n1,good\n", "rename a column to 'text', or map it, e.g. --columns review=text ("),
    ],
)
def test_predict_input_names_what_is_wrong_with_a_row(tmp_path: Path, name: str, content: str, said: str) -> None:
    """A blank text cell was told to map the id column as text; `"text": 12` that its rows have no 'text' while
    naming 'text' among them; rows without labels were told to map a label, which predict does not read."""
    from deltatune.cli.predict_io import read_rows
    from deltatune.data.files import DataError

    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as err:
        read_rows(str(tmp_path / name), None)
    assert said in str(err.value) and "=label" not in str(err.value)


def test_eval_on_data_of_another_task_type_names_both(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    """A classification delta scored on regression data (scores 0.5, 3.0) was refused by its head's shape,
    `(2, 32), this model's (1, 32): load the backbone with num_labels=2`: true, and not the user's mistake."""
    data = _csv(tmp_path / "mine.csv")
    assert _train(model_dir, data, tmp_path / "r", "--max-steps", "2", "--dev-split", "0.25") == 0
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"text": f"t {i}", "label": i / 2}) + "\n" for i in range(8)))
    capsys.readouterr()
    args = ["eval", "--delta", str(tmp_path / "r" / "delta-lora"), "--task", str(scores), "--split", "train"]
    assert main(args) == 2
    assert "trained for classification and " + str(scores) + " is a regression task" in capsys.readouterr().err


def test_predict_input_of_a_generation_task_reads_its_source(tmp_path: Path) -> None:
    """`predict --input webnlg/test.jsonl` with a generation delta was refused for want of a 'text', and the
    hint suggested `--columns category=text` (generating from the DBpedia category, not the triples)."""
    from deltatune.cli.predict_io import read_rows
    from deltatune.data.files import DataError

    rows = [{"category": "Airport", "source": f"A | b | {i}", "target": "t", "references": ["t"]} for i in range(3)]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_rows(str(path), None, generation=True)
    assert [m["text"] for _, m in read] == [r["source"] for r in rows] and read[0][0] == rows[0]
    with pytest.raises(DataError, match="no 'text' to predict from"):  # a classification delta has no source
        read_rows(str(path), None)
