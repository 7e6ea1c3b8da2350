"""deltatune.data: invalid task data is refused with an error that names the file, the line and the fix."""

from __future__ import annotations

import shutil

import pytest
from data_helpers import SENTIMENT, error_of, make_task, write_jsonl

from deltatune.data import DataError, data_root, load_task


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


def test_a_columns_mapping_naming_no_column_names_the_close_one(tmp_path):
    """`--columns review=text` on a file whose column is `Review`: the typo is named, not a missing field."""
    rows = [{"Review": "good", "Rating": "pos"}, {"Review": "bad", "Rating": "neg"}]
    folder = make_task(tmp_path, "senti", {}, train=rows, dev=rows)
    with pytest.raises(DataError, match=r"columns maps 'review', which no row has; did you mean 'Review'\?"):
        load_task(folder, columns={"review": "text", "Rating": "label"})
    with pytest.raises(DataError, match=r"columns maps 'Ratin', which no row has; did you mean 'Rating'\?"):
        load_task(folder, columns={"Review": "text", "Ratin": "label"})
    task = load_task(folder, columns={"Review": "text", "Rating": "label"})
    assert [e.text for e in task.splits["train"]] == ["good", "bad"]
    # one --columns serves every task of a study: a column this task lacks, with no near name, is let be
    task = load_task(folder, columns={"Review": "text", "Rating": "label", "Sentence2": "text_pair"})
    assert [e.text_pair for e in task.splits["train"]] == [None, None]


def test_a_columns_mapping_is_checked_over_every_split(tmp_path):
    """A label column only train and dev have (an unlabelled test split) is a column all the same."""
    rows = [{"Review": "good", "Rating": "pos"}, {"Review": "bad", "Rating": "neg"}]
    folder = make_task(tmp_path, "senti", {}, train=rows, dev=rows, test=[{"Review": "fine"}])
    with pytest.warns(UserWarning, match="no labels"):
        task = load_task(folder, columns={"Review": "text", "Rating": "label"})
    assert set(task.splits) == {"train", "dev"}


def test_labels_that_differ_only_in_case_or_spaces_are_refused_not_two_classes(tmp_path) -> None:  # noqa: ANN001
    """A spreadsheet's "positive " and "Negative" beside "positive" and "negative" became four classes, silently."""
    path = tmp_path / "mine.csv"
    path.write_text("text,label\ngood,positive\ngreat,positive \nbad,negative\nawful,Negative\n")
    with pytest.raises(DataError, match=r"line 3: label 'positive ' differs from 'positive' \(first at .*line 2\)"):
        load_task(path)
    labels = ["Negative", "negative", "positive", "positive "]  # said to be four classes: so they are
    assert load_task(path, labels=labels).labels == labels


def test_an_empty_csv_is_named_empty_not_a_closed_file(tmp_path):
    """A 0-byte .csv failed with "I/O operation on closed file" (the header was read after the close)."""
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(DataError, match=r"train.csv, line 1: empty file"):
        load_task(tmp_path / "train.csv")


@pytest.mark.parametrize("blank", ['"text_pair": null', "csv"])
def test_a_blank_second_text_in_a_pair_task_is_refused_as_a_blank_text_is(tmp_path, blank):
    """A blank text_pair cell made its row a single text: 20 of 200 RTE rows lost their hypothesis silently, and
    each was encoded one way alone in its batch, another beside paired rows (logits 4e-3 apart)."""
    if blank == "csv":
        (tmp_path / "train.csv").write_text("text,text_pair,label\na,b,yes\nc,,no\n")
        where = "train.csv, line 3"
    else:
        (tmp_path / "train.jsonl").write_text('{"text": "a", "text_pair": "b", "label": "yes"}\n'
                                              '{"text": "c", ' + blank + ', "label": "no"}\n')  # fmt: skip
        where = "train.jsonl, line 2"
    with pytest.raises(DataError, match=rf"{where}: 'text_pair' is empty \(a blank cell or null\)"):
        load_task(tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("t.jsonl", '{"text": "a", "label": NaN}\n{"text": "b", "label": 1}\n{"text": "c", "label": 0}\n'),
        ("t.csv", "text,label\na,pos\nb,nan\nc,neg\n"),
        ("r.csv", "text,label\na,1.5\nb,nan\n"),
    ],
)
def test_a_nan_label_is_a_missing_label(tmp_path, name, content):
    """json.dumps writes a missing float as NaN: the task was inferred as regression and told `regression label
    nan is not a finite number`; a CSV `nan` beside pos/neg became a third class, silently."""
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=r"line \d: label is .?nan.?, a missing value .*give every row a label"):
        load_task(tmp_path / name)


def test_a_tsv_with_csv_quotes_is_refused_not_read_as_literal_quotes(tmp_path):
    """pandas' `to_csv(sep="\\t")` quotes a cell holding a quote; a .tsv is read unquoted (GLUE's), so the text
    trained on was `"he said ""great"" twice"`, quotes and all."""
    (tmp_path / "q.tsv").write_text('text\tlabel\n"he said ""great"" twice"\tpos\nplain "quoted" word\tneg\n')
    with pytest.raises(DataError, match=r"q.tsv, line 2: the 'text' cell .* is in CSV quotes .*or as .csv"):
        load_task(tmp_path / "q.tsv")
    (tmp_path / "q.tsv").write_text('text\tlabel\n"quoted" start\tpos\nplain "quoted" word\tneg\n')
    assert load_task(tmp_path / "q.tsv")["train"][0].text == '"quoted" start'  # GLUE's own quotes stay text
    # a quoted text with a line break (pandas again): the row ended at the break, refused as "label is empty"
    (tmp_path / "q.tsv").write_text('text\tlabel\ngood\tpos\n"first line\nsecond line"\tneg\n')
    with pytest.raises(DataError, match=r"q.tsv, line 3: the cell '\"first line' opens a CSV quote and the row ends"):
        load_task(tmp_path / "q.tsv")
    (tmp_path / "q.tsv").write_text('text\tlabel\n"quoted" start\tpos\n"open quote only\tneg\n')  # all cells: kept
    assert load_task(tmp_path / "q.tsv")["train"][1].text == '"open quote only'
