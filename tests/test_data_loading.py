"""deltatune.data.load_task: task folders, single JSONL/CSV/TSV files and `datasets` objects (duck-typed),
their splits, label names, column mappings and delimiters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import SENTIMENT, FakeDataset, FakeLabel, error_of, make_task, write_jsonl

from deltatune.data import DataError, Example, load_task


def test_folder_with_meta_loads_splits_labels_license_and_metrics(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "fine", "label": 1}]
    folder = make_task(tmp_path, "senti", SENTIMENT, train=rows, dev=rows[:2], test=rows[:1])
    task = load_task(folder)
    assert (task.name, task.type, task.labels, task.license) == (
        "senti",
        "classification",
        ["negative", "positive"],
        "MIT",
    )
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 3, "dev": 2, "test": 1}
    assert task.num_labels == 2 and task.metric_names == ["accuracy", "macro_f1"] and task.primary_metric == "accuracy"
    assert task["validation"] is task.splits["dev"]


def test_label_string_equal_to_meta_label_maps_to_its_index(tmp_path):
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}]
    task = load_task(make_task(tmp_path, "senti", SENTIMENT, train=rows))
    assert [e.label for e in task["train"]] == [1, 0]


def test_pair_rows_keep_text_pair(tmp_path):
    meta = {"type": "pair_classification", "labels": ["entailment", "not_entailment"]}
    task = load_task(make_task(tmp_path, "nli", meta, train=[{"text": "p", "text_pair": "h", "label": 1}]))
    assert task["train"][0] == Example("p", "h", 1) and task.is_pair


def test_generation_rows_carry_target_and_references(tmp_path):
    meta = {"type": "generation"}
    rows = [{"source": "mr1", "target": "t1"}, {"source": "mr2", "target": "a", "references": ["a", "b"]}]
    task = load_task(make_task(tmp_path, "gen", meta, train=rows))
    assert task["train"][0] == Example("mr1", None, "t1", ("t1",))
    assert task["train"][1].references == ("a", "b")
    assert task.labels == [] and task.num_labels == 0 and task.primary_metric == "bleu"


def test_type_and_labels_are_inferred_without_meta(tmp_path):
    reg = load_task(
        write_jsonl(
            tmp_path / "reg.jsonl",
            [{"text": "a", "text_pair": "b", "label": 4}, {"text": "c", "text_pair": "d", "label": 1.5}],
        )
    )
    assert reg.type == "regression" and reg.num_labels == 1 and [e.label for e in reg["train"]] == [4.0, 1.5]
    cls = load_task(
        write_jsonl(tmp_path / "cls.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"}])
    )
    assert cls.type == "classification" and cls.labels == ["ham", "spam"] and [e.label for e in cls["train"]] == [1, 0]
    gen = load_task(write_jsonl(tmp_path / "gen.jsonl", [{"source": "x", "target": "y"}]))
    assert gen.type == "generation"


def test_single_file_is_train_unless_splits_say_otherwise(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    assert list(load_task(path).splits) == ["train"]
    assert list(load_task(path, splits=("test",)).splits) == ["test"]
    assert load_task(path).name == "rows"


def test_csv_file_loads_string_labels_and_numbers(tmp_path):
    path = tmp_path / "senti.csv"
    path.write_text('text,label\n"good, really",positive\nbad,negative\n', encoding="utf-8")
    task = load_task(path, labels=["negative", "positive"])
    assert [(e.text, e.label) for e in task["train"]] == [("good, really", 1), ("bad", 0)]
    reg = tmp_path / "sts.csv"
    reg.write_text("sentence1,sentence2,score\na,b,3.8\nc,d,1\n", encoding="utf-8")
    task = load_task(reg)
    assert task.type == "regression" and task["train"][0] == Example("a", "b", 3.8)


def test_csv_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nok,positive\nhmm,neutral\n", encoding="utf-8")
    msg = error_of(path, labels=["negative", "positive"])
    assert "bad.csv" in msg and "line 3" in msg and "neutral" in msg


def test_missing_split_named_explicitly_is_an_error_default_splits_skip_it(tmp_path):
    folder = make_task(tmp_path, "senti", SENTIMENT, train=[{"text": "a", "label": 0}])
    assert list(load_task(folder).splits) == ["train"]
    msg = error_of(folder, splits=("train", "test"))
    assert "'test'" in msg and "train.jsonl" in msg


def test_tsv_quotes_are_text_not_quoting(tmp_path):
    # GLUE-style TSV has no quoting: a sentence opening with '"' swallowed the next rows into itself (3 rows -> 1)
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\n"the movie was great\t1\nawful film\t0\n"quoted" text\t1\n', encoding="utf-8")
    task = load_task(path)
    assert [(e.text, e.label) for e in task["train"]] == [
        ('"the movie was great', 1),
        ("awful film", 0),
        ('"quoted" text', 1),
    ]


# -- datasets objects (duck-typed) ---------------------------------------------------------------
def test_datasetdict_like_object_loads_with_classlabel_names_and_validation_alias():
    feats = {"label": FakeLabel(["not_equivalent", "equivalent"])}
    dd = {
        "train": FakeDataset([{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}], feats),
        "validation": FakeDataset([{"sentence1": "c", "sentence2": "d", "label": 0, "idx": 1}], feats),
    }
    task = load_task(dd, name="mrpc")
    assert task.name == "mrpc" and task.labels == ["not_equivalent", "equivalent"]
    assert task.type == "pair_classification" and set(task.splits) == {"train", "dev"}
    assert task["dev"][0] == Example("c", "d", 0)


def test_single_dataset_like_object_errors_name_the_row():
    ds = FakeDataset([{"text": "a", "label": 0}, {"text": "b", "label": 7}], {"label": FakeLabel(["x", "y"])})
    msg = error_of(ds, name="toy")
    assert "toy" in msg and "row 1" in msg and "out of range" in msg


def test_a_loaded_task_remembers_where_it_came_from(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sub" / "train.jsonl", [{"text": "a", "label": 0}])
    assert load_task(path).source == str(path.resolve())
    assert load_task(path.parent).source == str(path.parent.resolve())


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_csv_with_another_delimiter_is_read_by_its_header(tmp_path: Path, delimiter: str) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(f"text{delimiter}label\ngood, really{delimiter}pos\nbad{delimiter}neg\n")
    task = load_task(path)
    assert task.labels == ["neg", "pos"] and task["train"][0].text == "good, really"


def test_columns_map_a_users_fields_from_the_call_or_meta_json_and_are_kept(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("Review,Sentiment\ngood,pos\nbad,neg\n")
    with pytest.raises(DataError, match="the rows have 'Review', 'Sentiment'.*--columns Sentiment=label,Review=text "):
        load_task(tmp_path)  # both fields missing: one hint maps both, not one per attempt
    task = load_task(tmp_path, columns={"Review": "text", "Sentiment": "label"})
    assert task.labels == ["neg", "pos"] and task.meta["columns"] == {"Review": "text", "Sentiment": "label"}
    (tmp_path / "meta.json").write_text(json.dumps({"columns": {"Review": "text", "Sentiment": "label"}}))
    assert load_task(tmp_path)["train"][0].text == "good"
    for bad, match in (({"Review": "txt"}, "'txt' is not a field"), (["Review"], "must map a column name")):
        with pytest.raises(DataError, match=match):
            load_task(tmp_path, columns=bad)


def test_a_header_that_differs_from_a_field_only_in_case_is_that_field(tmp_path: Path) -> None:
    """A spreadsheet's "Text,Label" header was refused ("missing field 'text'") and the hint asked for
    --columns Text=text. The one column whose name folds to a field or an alias is that field; two such
    columns ("Text" and "TEXT") are left for the user to say which."""
    (tmp_path / "train.csv").write_text("Sentence,Label\ngood,pos\nbad,neg\n")
    task = load_task(tmp_path)
    assert task.labels == ["neg", "pos"] and [e.text for e in task["train"]] == ["good", "bad"]
    (tmp_path / "train.csv").write_text("Text,TEXT,label\ngood,x,pos\nbad,y,neg\n")
    with pytest.raises(DataError, match="missing field 'text'.*'TEXT', 'Text'"):
        load_task(tmp_path)


@pytest.mark.parametrize("test_rows", ["id,text\n1,lovely\n2,horrid\n", "text,label\nlovely,-1\nhorrid,-1\n"])
def test_an_unlabeled_test_split_is_left_out_with_a_warning_not_a_failure(tmp_path: Path, test_rows: str) -> None:
    """Kaggle's test.csv (no label column) or GLUE's (labels -1) failed the whole task, so nothing could
    train: "missing field 'label'" / "mixed label types". It is left out now, saying how to predict it."""
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    (tmp_path / "dev.csv").write_text("text,label\nnice,pos\nawful,neg\n")
    (tmp_path / "test.csv").write_text(test_rows)
    with pytest.warns(UserWarning, match="has no labels, so it is not loaded as the test split.*--input"):
        task = load_task(tmp_path)
    assert list(task.splits) == ["train", "dev"] and task.labels == ["neg", "pos"]
    (tmp_path / "test.csv").write_text("text,label\nlovely,pos\nhorrid,\n")  # one label missing: a mistake
    with pytest.raises(DataError, match=r"line 3: label is empty \(a blank cell or null\)"):
        load_task(tmp_path)


def test_dev_and_test_rows_that_repeat_a_train_row_are_counted_in_a_note(tmp_path: Path) -> None:
    from deltatune.data.split import overlap_note

    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", [{"text": f"d{i}", "label": i % 2} for i in range(10)])
    write_jsonl(tmp_path / "test.jsonl", rows[:4] + [{"text": "new", "label": 0}] * 6)
    assert overlap_note(load_task(tmp_path)).startswith("note: 4 of 10 test rows (40%) have the same input as a train")
    write_jsonl(tmp_path / "test.jsonl", rows[:2] + [{"text": "new", "label": 0}] * 8)  # 2 rows: no note
    assert overlap_note(load_task(tmp_path)) is None
