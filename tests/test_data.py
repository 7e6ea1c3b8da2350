"""deltatune.data: loading and validating tasks, few-shot sampling, metrics against known values."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from deltatune.data import (
    DataError,
    Example,
    compute_metrics,
    data_root,
    few_shot,
    few_shot_task,
    format_task_table,
    list_tasks,
    load_task,
)
from deltatune.data import metrics as M

SENTIMENT = {"name": "senti", "type": "classification", "labels": ["negative", "positive"], "license": "MIT"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def make_task(root: Path, name: str, meta: dict | None, **splits: list) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    for split, rows in splits.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def error_of(source, **kw) -> str:  # noqa: ANN001
    with pytest.raises(DataError) as info:
        load_task(source, **kw)
    return str(info.value)


# ----------------------------------------------------------------------------- loading


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
        write_jsonl(tmp_path / "reg.jsonl", [{"text": "a", "text_pair": "b", "label": 4}, {"text": "c", "label": 1.5}])
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


# ----------------------------------------------------------------------------- validation errors name file and line


def test_empty_file_is_an_error(tmp_path):
    folder = make_task(tmp_path, "senti", SENTIMENT, train=[])
    msg = error_of(folder)
    assert "train.jsonl" in msg and "line 1" in msg and "empty" in msg


def test_invalid_json_names_file_and_line(tmp_path):
    folder = make_task(tmp_path, "senti", SENTIMENT, train=[{"text": "a", "label": 0}, '{"text": "b", "label": 1'])
    msg = error_of(folder)
    assert "train.jsonl" in msg and "line 2" in msg and "invalid JSON" in msg


def test_missing_text_field_names_file_and_line(tmp_path):
    folder = make_task(tmp_path, "senti", SENTIMENT, dev=[{"text": "a", "label": 0}, {"sentenc": "b", "label": 1}])
    msg = error_of(folder)
    assert "dev.jsonl" in msg and "line 2" in msg and "'text'" in msg


def test_missing_source_field_in_generation_names_file_and_line(tmp_path):
    folder = make_task(tmp_path, "gen", {"type": "generation"}, test=[{"source": "a", "target": "b"}, {"target": "c"}])
    msg = error_of(folder)
    assert "test.jsonl" in msg and "line 2" in msg and "'source'" in msg


def test_unknown_label_string_names_file_line_and_labels(tmp_path):
    folder = make_task(
        tmp_path, "senti", SENTIMENT, train=[{"text": "a", "label": "positive"}, {"text": "b", "label": "neutral"}]
    )
    msg = error_of(folder)
    assert "train.jsonl" in msg and "line 2" in msg and "'neutral'" in msg and "positive" in msg


def test_label_index_out_of_range_names_file_and_line(tmp_path):
    folder = make_task(
        tmp_path,
        "senti",
        SENTIMENT,
        train=[{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": 2}],
    )
    msg = error_of(folder)
    assert "train.jsonl" in msg and "line 3" in msg and "out of range" in msg


def test_mixed_int_and_string_labels_name_both_lines(tmp_path):
    folder = make_task(
        tmp_path,
        "senti",
        SENTIMENT,
        train=[{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": "positive"}],
    )
    msg = error_of(folder)
    assert "line 3" in msg and "line 1" in msg and "mixed label types" in msg


def test_mixed_int_and_float_labels_in_classification_are_an_error(tmp_path):
    folder = make_task(tmp_path, "senti", SENTIMENT, train=[{"text": "a", "label": 0}, {"text": "b", "label": 0.5}])
    msg = error_of(folder)
    assert "train.jsonl" in msg and "line 2" in msg and "mixed label types" in msg


def test_mixed_label_types_without_meta_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}])
    msg = error_of(path)
    assert "x.jsonl" in msg and "line 2" in msg and "line 1" in msg and "mixed label types" in msg


def test_inferred_labels_refuse_a_dev_label_that_train_never_shows(tmp_path):
    # without meta.json the classes come from every split: "Pos" in dev became a third class, never trained
    rows = [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}]
    folder = make_task(tmp_path, "typo", None, train=rows, dev=[rows[0], {"text": "c", "label": "Pos"}])
    msg = error_of(folder)
    assert "dev.jsonl" in msg and "line 2" in msg and "'Pos'" in msg and "meta.json" in msg
    # listing the classes in meta.json says the train split really lacks one: accepted
    meta = {"type": "classification", "labels": ["neg", "pos", "Pos"]}
    shutil.rmtree(folder)
    task = load_task(make_task(tmp_path, "typo", meta, train=rows, dev=[rows[0], {"text": "c", "label": "Pos"}]))
    assert [e.label for e in task["dev"]] == [0, 2]


def test_two_files_for_one_split_are_refused_not_one_ignored(tmp_path):
    rows = [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}]
    folder = make_task(tmp_path, "two", None, train=rows, dev=rows)
    (folder / "train.csv").write_text("text,label\nc,pos\n", encoding="utf-8")
    msg = error_of(folder)
    assert "several files for the train split (train.jsonl, train.csv)" in msg
    (folder / "train.csv").unlink()
    write_jsonl(folder / "validation.jsonl", rows)  # "validation" is read as dev, beside dev.jsonl
    assert "several files for the dev split (dev.jsonl, validation.jsonl)" in error_of(folder)


def test_a_csv_quote_left_open_is_refused_not_read_as_one_long_text(tmp_path):
    # `"bad movie,0` opened a quoted text that swallowed the next line: 'bad movie,0\nfine film' labelled 1
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\ngood movie,1\n"bad movie,0\nfine film",1\nawful,0\n', encoding="utf-8")
    assert "bad.csv, line 3: the quoted 'text' runs over several lines and holds 'bad movie,0'" in error_of(bad)
    ok = tmp_path / "ok.csv"  # a real text over two lines, with a comma and a digit in it
    ok.write_text('text,label\n"a long review\nwith two parts, 1 short",1\nawful,0\n', encoding="utf-8")
    assert [e.text for e in load_task(ok)["train"]] == ["a long review\nwith two parts, 1 short", "awful"]


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


def test_a_null_label_is_a_missing_label_not_a_crash(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": None}, {"text": "b", "label": 1}])
    msg = error_of(path)
    assert "x.jsonl, line 1" in msg and "null" in msg


def test_non_numeric_regression_label_names_file_and_line(tmp_path):
    folder = make_task(
        tmp_path, "sts", {"type": "regression"}, train=[{"text": "a", "label": 1.0}, {"text": "b", "label": "high"}]
    )
    msg = error_of(folder)
    assert "train.jsonl" in msg and "line 2" in msg and "non-numeric" in msg


def test_unknown_task_name_suggests_close_names_and_says_where_it_looked(tmp_path, monkeypatch):
    for name in ("sst2", "sst5", "stsb"):
        make_task(tmp_path, name, SENTIMENT, train=[{"text": "a", "label": 0}])
    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path))
    msg = error_of("sst3")
    assert "sst2" in msg and "sst5" in msg and str(tmp_path) in msg
    assert load_task("SST-2").name == "sst2"


def test_data_root_env_pointing_nowhere_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="DELTATUNE_DATA"):
        data_root()


# ----------------------------------------------------------------------------- datasets objects (duck-typed)


class FakeLabel:
    def __init__(self, names):  # noqa: ANN001
        self.names = names


class FakeDataset:
    """The parts of `datasets.Dataset` the loader uses: column_names, features, iteration over dict rows."""

    def __init__(self, rows, features=None):  # noqa: ANN001
        self.rows, self.features = rows, features or {}
        self.column_names = list(rows[0]) if rows else []

    def __iter__(self):
        return iter(self.rows)


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


# ----------------------------------------------------------------------------- listing


def test_list_tasks_and_table_read_meta_and_count_rows(tmp_path):
    make_task(tmp_path, "senti", SENTIMENT, train=[{"text": "a", "label": 0}] * 3, test=[{"text": "b", "label": 1}])
    make_task(tmp_path, "sts", {"type": "regression", "license": "CC BY-SA 4.0"}, train=[{"text": "a", "label": 1.0}])
    rows = list_tasks(tmp_path)
    assert rows[0] == {
        "name": "senti",
        "type": "classification",
        "num_labels": 2,
        "splits": {"train": 3, "test": 1},
        "license": "MIT",
    }
    assert rows[1]["num_labels"] == 1
    table = format_task_table(rows).splitlines()
    assert table[0].split() == ["task", "type", "labels", "train", "dev", "test", "license"]
    assert table[2].split() == ["senti", "classification", "2", "3", "-", "1", "MIT"]
    assert len({len(line.split("MIT")[0]) for line in (table[0].split("license")[0] + "MIT", table[2])}) == 1


# ----------------------------------------------------------------------------- few-shot


def _balanced(n_per_class: int, n_classes: int = 3) -> list[Example]:
    return [Example(f"t{c}-{i}", None, c) for c in range(n_classes) for i in range(n_per_class)]


def test_few_shot_takes_k_per_class_deterministically_per_seed():
    data = _balanced(20)
    a, b, c = few_shot(data, 4, seed=1), few_shot(data, 4, seed=1), few_shot(data, 4, seed=2)
    assert a == b and a != c
    assert sorted(e.label for e in a) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(a)) == 12


def test_few_shot_names_the_short_class_and_its_count():
    data = _balanced(5, 2) + [Example("rare", None, 2)]
    with pytest.raises(DataError, match=r"'neutral' \(label 2\): 1"):
        few_shot(data, 2, seed=0, labels=["neg", "pos", "neutral"])
    with pytest.raises(DataError, match=r"label 3\): 0"):
        few_shot(data, 1, seed=0, labels=["a", "b", "c", "never_seen"])


def test_few_shot_regression_and_generation_take_k_in_total():
    reg = [Example(f"t{i}", None, float(i)) for i in range(30)]
    gen = [Example(f"s{i}", None, f"y{i}", (f"y{i}",)) for i in range(30)]
    assert len(few_shot(reg, 8, seed=0)) == 8 and len(few_shot(gen, 8, seed=0)) == 8
    with pytest.raises(DataError, match="only 30"):
        few_shot(gen, 31, seed=0)


def test_few_shot_task_has_disjoint_train_and_dev_and_keeps_test(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(40)]
    task = load_task(make_task(tmp_path, "senti", SENTIMENT, train=rows, test=rows[:5]))
    small = few_shot_task(task, 4, seed=3)
    assert len(small["train"]) == len(small["dev"]) == 8
    assert not {e.text for e in small["train"]} & {e.text for e in small["dev"]}
    assert small["test"] == task["test"] and small.meta["few_shot"] == {"k": 4, "dev_k": 4, "seed": 3}


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_match_hand_computed_values():
    preds, refs = [0, 1, 1, 0], [0, 1, 0, 0]
    assert M.accuracy(preds, refs) == pytest.approx(0.75)
    # class 0: P=1, R=2/3 -> F1=0.8; class 1: P=1/2, R=1 -> F1=2/3
    assert M.macro_f1(preds, refs) == pytest.approx((0.8 + 2 / 3) / 2)
    # TP=1 TN=2 FP=1 FN=0: (1*2 - 1*0) / sqrt(2*1*3*2)
    assert M.matthews(preds, refs) == pytest.approx(2 / math.sqrt(12))


def test_macro_f1_averages_over_the_classes_that_occur():
    # a dev split (or a --max-eval sample) without class "c": perfect predictions are a macro-F1 of 1, not 2/3
    from deltatune.data import Task

    task = Task("t", "classification", ["a", "b", "c"])
    assert compute_metrics(task, [0, 1, 0, 1], [0, 1, 0, 1])["macro_f1"] == pytest.approx(1.0)
    # a wrongly predicted absent class still counts: class 2 has F1 0 (predicted, never true)
    assert compute_metrics(task, [0, 1, 2, 1], [0, 1, 0, 1])["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # an unknown label string is a miss of the true class, not a class of its own
    assert compute_metrics(task, ["a", "b", "zzz"], [0, 1, 1])["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)


def test_correlations_of_perfect_and_monotone_relations():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3, 4], [1, 4, 9, 16]) < 0.99
    assert M.pearson([2, 2, 2], [1, 2, 3]) == 0.0  # constant predictions: defined as 0, not nan


def test_bleu_identical_is_100_and_multiple_references_count():
    hyp = ["the cat sat on the mat today", "a dog barked loudly at the postman"]
    assert M.bleu(hyp, hyp) == pytest.approx(100.0)
    refs = [["a cat was sitting on a mat", "the cat sat on the mat today"], ["a dog barked loudly at the postman"]]
    assert M.bleu(hyp, refs) == pytest.approx(100.0)
    assert M.bleu(hyp, [r[0] for r in refs]) < 100.0


def test_rouge_l_of_a_known_pair():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens of 6 and 6
    assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    assert M.rouge_l(["the cat sat on the mat"], [["zzz", "the cat sat on the mat"]]) == pytest.approx(100.0)


def test_compute_metrics_chooses_by_task_and_accepts_examples_and_label_strings(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 1}]
    cola = load_task(
        make_task(tmp_path, "cola", {"type": "classification", "labels": ["unacceptable", "acceptable"]}, test=rows)
    )
    out = compute_metrics(cola, ["unacceptable", "acceptable", "garbage"], cola["test"])
    assert set(out) == {"accuracy", "macro_f1", "matthews"} and out["accuracy"] == pytest.approx(2 / 3)
    assert cola.primary_metric == "matthews"
    assert set(compute_metrics("regression", [1.0, 2.0], [1.5, 2.5])) == {"pearson", "spearman"}
    gen = load_task(
        write_jsonl(tmp_path / "g.jsonl", [{"source": "s", "target": "x y z w", "references": ["x y z w", "q"]}])
    )
    assert compute_metrics(gen, ["x y z w"], gen["train"]) == {
        "bleu": pytest.approx(100.0),
        "rouge_l": pytest.approx(100.0),
    }
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        compute_metrics(cola, [0, 1], cola["test"])


def test_metric_without_its_package_names_the_study_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"deltatune\[study\]"):
        M.bleu(["a"], ["a"])


# ----------------------------------------------------------------------------- the shared collection


def _shared_root() -> Path:
    try:
        root = data_root()
    except DataError:
        pytest.skip("shared task collection not found (set $DELTATUNE_DATA or put ../shared beside the checkout)")
    if not (root / "sst2").is_dir():
        pytest.skip(f"{root} holds no sst2")
    return root


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "task_type", "pair"),
    [
        ("sst2", "classification", False),
        ("stsb", "regression", True),
        ("rte", "pair_classification", True),
        ("e2e_nlg", "generation", False),
    ],
)
def test_shared_collection_tasks_load_with_the_sizes_of_their_meta(name, task_type, pair):
    root = _shared_root()
    meta = json.loads((root / name / "meta.json").read_text())
    task = load_task(name)
    assert task.type == task_type and task.is_pair == pair
    assert {s: len(v) for s, v in task.splits.items()} == meta["counts"]
    assert task.labels == meta.get("labels", [])
    if task_type == "generation":
        assert all(e.references and e.label == e.references[0] for e in task["test"])


@pytest.mark.integration
def test_shared_collection_listing_matches_index():
    root = _shared_root()
    index = {e["name"]: e for e in json.loads((root / "INDEX.json").read_text())}
    rows = {r["name"]: r for r in list_tasks()}
    assert set(index) <= set(rows)
    assert rows["sst2"]["splits"] == index["sst2"]["counts"] and rows["stsb"]["num_labels"] == 1


# ----------------------------------------------------------------------------- holding out a dev split


def _skewed_task(tmp_path: Path):  # noqa: ANN202
    rows = [{"text": f"row {i}", "label": "rare" if i % 10 == 0 else "common"} for i in range(60)]
    return load_task(write_jsonl(tmp_path / "mine.jsonl", rows))


def test_a_held_out_dev_split_is_stratified_seeded_disjoint_and_in_file_order(tmp_path: Path) -> None:
    from deltatune.data.split import hold_out_dev

    task = _skewed_task(tmp_path)
    split = hold_out_dev(task, 0.2, seed=3)
    train, dev = split["train"], split["dev"]
    assert len(dev) == 12 and len(train) == 48  # 20% of 54 common + 20% of 6 rare, rounded per class
    rare = task.labels.index("rare")
    assert sum(e.label == rare for e in dev) == 1 and sum(e.label == rare for e in train) == 5
    assert sorted(e.text for e in train + dev) == sorted(e.text for e in task["train"])  # nothing lost or doubled
    order = [e.text for e in task["train"]]
    assert [order.index(e.text) for e in dev] == sorted(order.index(e.text) for e in dev)
    assert hold_out_dev(task, 0.2, seed=3)["dev"] == dev and hold_out_dev(task, 0.2, seed=4)["dev"] != dev
    assert split.meta["dev_split"] == {"fraction": 0.2, "seed": 3, "stratified": True, "train": 48, "dev": 12}
    assert "dev" not in task.splits  # the original task is untouched


def test_a_class_too_small_to_sample_still_lands_in_dev_and_train(tmp_path: Path) -> None:
    from deltatune.data.split import hold_out_dev

    rows = [{"text": f"r{i}", "label": "a"} for i in range(40)] + [
        {"text": "x", "label": "b"},
        {"text": "y", "label": "b"},
    ]
    split = hold_out_dev(load_task(write_jsonl(tmp_path / "t.jsonl", rows)), 0.1)
    assert {e.label for e in split["dev"]} == {0, 1} and {e.label for e in split["train"]} == {0, 1}


def test_holding_out_dev_refuses_data_that_has_one_or_is_too_small(tmp_path: Path) -> None:
    from deltatune.data.split import hold_out_dev

    folder = make_task(tmp_path, "t", SENTIMENT, train=[{"text": "a", "label": 0}] * 4, dev=[{"text": "b", "label": 1}])
    with pytest.raises(DataError, match="already has a dev split"):
        hold_out_dev(load_task(folder), 0.1)
    with pytest.raises(DataError, match="between 0 and 1"):
        hold_out_dev(_skewed_task(tmp_path), 1.0)
    one = load_task(write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": 0}]))
    with pytest.raises(DataError, match="too few"):
        hold_out_dev(one, 0.5)


def test_a_loaded_task_remembers_where_it_came_from(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sub" / "train.jsonl", [{"text": "a", "label": 0}])
    assert load_task(path).source == str(path.resolve())
    assert load_task(path.parent).source == str(path.parent.resolve())


# ----------------------------------------------------------------------------- numeric labels in users' own files


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


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_csv_with_another_delimiter_is_read_by_its_header(tmp_path: Path, delimiter: str) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(f"text{delimiter}label\ngood, really{delimiter}pos\nbad{delimiter}neg\n")
    task = load_task(path)
    assert task.labels == ["neg", "pos"] and task["train"][0].text == "good, really"


def test_columns_map_a_users_fields_from_the_call_or_meta_json_and_are_kept(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("Review,Sentiment\ngood,pos\nbad,neg\n")
    with pytest.raises(DataError, match="the rows have 'Review', 'Sentiment'.*--columns Sentiment=label"):
        load_task(tmp_path)
    task = load_task(tmp_path, columns={"Review": "text", "Sentiment": "label"})
    assert task.labels == ["neg", "pos"] and task.meta["columns"] == {"Review": "text", "Sentiment": "label"}
    (tmp_path / "meta.json").write_text(json.dumps({"columns": {"Review": "text", "Sentiment": "label"}}))
    assert load_task(tmp_path)["train"][0].text == "good"
    for bad, match in (({"Review": "txt"}, "'txt' is not a field"), (["Review"], "must map a column name")):
        with pytest.raises(DataError, match=match):
            load_task(tmp_path, columns=bad)


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
