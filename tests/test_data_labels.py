"""deltatune.data: numeric labels in users' own files and ClassLabels: classes or regression targets,
class indices or class names, mapped by value or by name in every split.
"""

from __future__ import annotations

from data_helpers import FakeDataset, FakeLabel, error_of, make_task, write_jsonl

from deltatune.data import load_task


def test_whole_number_float_labels_are_classes_not_regression(tmp_path):
    # pandas writes an int column holding a NaN as 1.0/0.0; the same labels written as 1/0 are classes
    task = load_task(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.0}]))
    assert task.type == "classification" and task.labels == ["0", "1"]
    assert [task.labels[e.label] for e in task["train"]] == ["1", "0"]
    many = write_jsonl(tmp_path / "many.jsonl", [{"text": str(i), "label": float(i)} for i in range(30)])
    assert 'meta.json: "type": "classification" or "regression"' in error_of(many)
    assert load_task(many, task_type="classification").num_labels == 30  # the advice, taken, works
    assert load_task(many, task_type="regression")["train"][29].label == 29.0
    assert load_task(write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 1.5}])).type == "regression"


def test_many_integer_labels_are_classes_only_when_they_number_classes(tmp_path):
    # 77 intent ids are classes; 40 distinct ages or scores were silently a 40-way classifier
    intents = write_jsonl(tmp_path / "i.jsonl", [{"text": str(i), "label": i} for i in range(77)])
    assert load_task(intents).num_labels == 77
    ages = write_jsonl(tmp_path / "a.jsonl", [{"text": str(i), "label": 18 + 2 * i} for i in range(40)])
    assert "40 distinct integer labels (18..96" in error_of(ages)
    assert 'meta.json: "type": "classification" or "regression"' in error_of(ages)
    assert load_task(ages, task_type="regression")["train"][1].label == 20.0
    assert load_task(ages, task_type="classification").num_labels == 40
    few = write_jsonl(tmp_path / "f.jsonl", [{"text": str(i), "label": 18 + 2 * i} for i in range(20)])
    assert load_task(few).num_labels == 20


def test_integer_labels_1_to_3_are_three_classes_mapped_by_value_in_every_split(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    write_jsonl(
        folder / "train.jsonl", [{"text": "a", "label": 3}, {"text": "b", "label": 1}, {"text": "c", "label": 2}]
    )
    (folder / "dev.csv").write_text("text,label\nd,2\ne,3\n", encoding="utf-8")
    task = load_task(folder)
    assert task.labels == ["1", "2", "3"] and task.num_labels == 3  # no dead class "0"
    assert [task.labels[e.label] for e in task["train"]] == ["3", "1", "2"]
    assert [task.labels[e.label] for e in task["dev"]] == ["2", "3"]


def test_numeric_string_labels_sort_numerically_in_every_split(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "a", "label": "10"}, {"text": "b", "label": "2"}])
    write_jsonl(folder / "dev.jsonl", [{"text": "c", "label": "2"}])
    task = load_task(folder)
    assert task.labels == ["2", "10"]
    assert [e.label for e in task["train"]] == [1, 0] and [e.label for e in task["dev"]] == [0]
    assert load_task(
        write_jsonl(tmp_path / "w.jsonl", [{"text": "a", "label": "b10"}, {"text": "b", "label": "b2"}])
    ).labels == ["b10", "b2"]


def test_an_integer_label_is_refused_when_meta_labels_are_numbers_out_of_index_order(tmp_path):
    folder = make_task(tmp_path, "t", {"type": "classification", "labels": ["1", "0"]}, dev=[{"text": "a", "label": 1}])
    (folder / "train.csv").write_text("text,label\nb,1\nc,0\n", encoding="utf-8")
    message = error_of(folder)
    assert "dev.jsonl, line 1: label 1 is ambiguous" in message and '"1"' in message and "\n" not in message
    write_jsonl(folder / "dev.jsonl", [{"text": "a", "label": "1"}])  # the name, as in the CSV: same class
    task = load_task(folder)
    assert task["train"][0].label == task["dev"][0].label == 0
    plain = make_task(
        tmp_path, "p", {"type": "classification", "labels": ["0", "1"]}, train=[{"text": "a", "label": 1}]
    )
    assert load_task(plain)["train"][0].label == 1  # names equal to the indices: no ambiguity


def test_classlabel_ints_stay_indices_even_when_its_names_are_numbers():
    # a ClassLabel's ints are indices by definition (e.g. star ratings named "1".."5"): nothing ambiguous
    ds = FakeDataset([{"text": "a", "label": 0}, {"text": "b", "label": 4}], {"label": FakeLabel(list("12345"))})
    task = load_task(ds)
    assert [task.labels[e.label] for e in task["train"]] == ["1", "5"]


def test_datasetdict_splits_with_their_own_classlabel_order_map_by_name():
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    dd = {
        "train": FakeDataset(rows, {"label": FakeLabel(["neg", "pos"])}),
        "validation": FakeDataset([{"text": "good", "label": 0}], {"label": FakeLabel(["pos", "neg"])}),
        "test": FakeDataset([{"text": "bad", "label": 0}]),  # no ClassLabel here: the others name the classes
    }
    task = load_task(dd, name="swap")
    assert task.labels == ["neg", "pos"]
    assert [task.labels[e.label] for e in task["dev"]] == ["pos"] and task["train"][0].label == 1
    dd["validation"] = FakeDataset([{"text": "good", "label": 0}], {"label": FakeLabel(["yes", "no"])})
    assert "split 'dev' has the classes ['yes', 'no'], split 'train' has ['neg', 'pos']" in error_of(dd, name="x")
