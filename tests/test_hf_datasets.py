"""Tasks from real `datasets` objects and from the files users' tools write, as users pass them.

The loader reads `datasets` objects by duck typing (test_data_loading.py and test_data_labels.py cover
that with stand-ins); these tests use the library itself, so a release that changes what a Dataset yields
(numpy strings, ClassLabel -1 for hidden labels, IterableDataset) is caught. Each bad input must fail at
its row, in one line that says what is wrong with the row, not a neighbouring cause.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deltatune.data import DataError, Example, load_task

D = pytest.importorskip("datasets")

SST = D.Features({"sentence": D.Value("string"), "label": D.ClassLabel(names=["neg", "pos"]), "idx": D.Value("int32")})


def _sst(sentences: list[str], labels: list[int]) -> object:
    return D.Dataset.from_dict({"sentence": sentences, "label": labels, "idx": list(range(len(labels)))}, features=SST)


def test_a_glue_like_datasetdict_keeps_classlabel_names_and_leaves_its_hidden_test_labels_out() -> None:
    train = _sst(["good", "bad", "fine"], [1, 0, 1])
    dd = D.DatasetDict({"train": train, "validation": train, "test": _sst(["x", "y"], [-1, -1])})
    with pytest.warns(UserWarning, match=r"split 'test' has no labels.*to_csv\('test.csv'\), then deltatune predict"):
        task = load_task(dd, name="sst2")
    assert task.labels == ["neg", "pos"] and list(task.splits) == ["train", "dev"]
    assert task["train"][0] == Example("good", None, 1)


def test_classlabel_minus_one_in_a_training_split_is_named_a_missing_label() -> None:
    with pytest.raises(DataError, match=r"row 1: label -1 marks a missing label.*ds.filter"):
        load_task(_sst(["good", "bad"], [1, -1]), name="mixed")


@pytest.mark.parametrize("fmt", [None, "numpy", "torch", "pandas"])
def test_formatted_and_iterable_datasets_give_plain_examples(fmt: str | None) -> None:
    ds = _sst(["good", "bad"], [1, 0])
    ds = ds.with_format(fmt) if fmt else ds
    for source in (ds, ds.to_iterable_dataset()) if fmt is None else (ds,):
        task = load_task(source, name="t")
        assert task.labels == ["neg", "pos"]
        assert [(type(e.text), e.text, e.label) for e in task["train"]] == [(str, "good", 1), (str, "bad", 0)]


def test_regression_float32_and_a_pandas_frame_with_its_index() -> None:
    pd = pytest.importorskip("pandas")
    stsb = D.Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0.5, 4.25]},
        features=D.Features(
            {"sentence1": D.Value("string"), "sentence2": D.Value("string"), "label": D.Value("float32")}
        ),
    )
    task = load_task(stsb, name="stsb")
    assert task.type == "regression" and task["train"][1] == Example("b", "d", 4.25)
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]}, index=[10, 11, 12])
    assert load_task(D.Dataset.from_pandas(frame), name="pd")["train"][2] == Example("c", None, 0)
    # an int column with a missing value is read by pandas as floats with a NaN: that row is named
    holes = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, None]})
    with pytest.raises(DataError, match="row 2: label is empty"):
        load_task(D.Dataset.from_pandas(holes), name="holes")


def test_multi_label_rows_are_refused_as_such_not_as_a_missing_column(tmp_path: Path) -> None:
    ds = D.Dataset.from_dict({"text": ["a", "b"], "label": [[0, 1], [1]]})
    with pytest.raises(DataError, match=r"row 0: label \[0, 1\] is a list, not one class or number.*multi-label"):
        load_task(ds, name="ml")
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": {"x": 1}}\n')
    with pytest.raises(DataError, match=r"line 1: label \{'x': 1\} is a dict"):
        load_task(tmp_path)


def test_a_load_dataset_csv_and_a_column_mapping(tmp_path: Path) -> None:
    (tmp_path / "reviews.csv").write_text("Review,Sentiment\nhello,p\nbye,n\n")
    dd = D.load_dataset("csv", data_files={"train": str(tmp_path / "reviews.csv")}, cache_dir=str(tmp_path / "c"))
    task = load_task(dd, name="reviews", columns={"Review": "text", "Sentiment": "label"})
    assert task.labels == ["n", "p"] and task["train"][0] == Example("hello", None, 1)


def test_a_blank_text_cell_is_named_as_such_not_as_a_missing_column(tmp_path: Path) -> None:
    """A CSV drops blank cells, so a row with an empty text read as 'missing field text: rename a column'."""
    (tmp_path / "train.csv").write_text("text,label\nhey,1\n,1\nhello,0\n")
    with pytest.raises(DataError, match=r"line 3: 'text' is empty \(a blank cell or null\); give every row its text"):
        load_task(tmp_path / "train.csv")
    (tmp_path / "null.jsonl").write_text('{"text": "a", "label": 1}\n{"text": null, "label": 0}\n')
    with pytest.raises(DataError, match=r"line 2: 'text' is empty"):
        load_task(tmp_path / "null.jsonl")
    (tmp_path / "nolabel.csv").write_text("text\nhey\n")  # no such column at all: the mapping hint
    with pytest.raises(DataError, match=r"missing field 'label'; the rows have 'text'"):
        load_task(tmp_path / "nolabel.csv", task_type="classification", labels=["a", "b"])


def test_whitespace_only_texts_load_with_one_warning_per_split(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text('text,label\nhey,1\n"  ",1\nhello,0\n" ",0\n')
    with pytest.warns(UserWarning, match=r"2 of 4 rows of train have an empty text \(first: .*line 3\)") as caught:
        task = load_task(tmp_path / "train.csv")
    assert len(caught) == 1 and [e.label for e in task["train"]] == [1, 1, 0, 0]


@pytest.mark.parametrize("orient", ["columns", "records", "split", "table", "index", "lines"])
def test_json_files_in_every_layout_pandas_writes_load_as_their_rows(orient: str, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "x"]})
    file = tmp_path / "train.json"
    frame.to_json(file, orient="records", lines=True) if orient == "lines" else frame.to_json(file, orient=orient)
    task = load_task(file)
    assert task.labels == ["x", "y"] and [(e.text, e.label) for e in task["train"]] == [("a", 0), ("b", 1), ("c", 0)]


def test_json_files_that_are_not_a_table_are_refused_in_one_line(tmp_path: Path) -> None:
    for content, match in [
        ("3", "expected an array of row objects or an object of columns, got a JSON int"),
        ('[["a", 1], ["b", 0]]', r"item 0: expected a JSON object per row, got list \(a table without column names"),
        ('{"text": ["a", "b"], "label": [1]}', r"its columns have different lengths \(\[1, 2\]\)"),
        ('[{"text": "a", "label": 1},', r"line 1: invalid JSON"),
    ]:
        (tmp_path / "t.json").write_text(content)
        with pytest.raises(DataError, match=match):
            load_task(tmp_path / "t.json")


def test_parquet_files_and_folders_of_mixed_formats(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({"sentence": ["good", "bad"], "label": [1, 0]}).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame({"sentence": ["fine"], "label": [1]}).to_json(tmp_path / "validation.json", orient="records")
    (tmp_path / "test.jsonl").write_text('{"sentence": "awful", "label": -1}\n')
    with pytest.warns(UserWarning, match=r"test.jsonl has no labels.*--input .*test.jsonl"):
        task = load_task(tmp_path)
    assert task.labels == ["0", "1"] and task["train"] == [Example("good", None, 1), Example("bad", None, 0)]
    assert task["dev"] == [Example("fine", None, 1)]
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        load_task(tmp_path / "broken.parquet")


def test_a_save_to_disk_folder_loads_as_its_datasets_object(tmp_path: Path) -> None:
    train = _sst(["good", "bad", "fine"], [1, 0, 1])
    D.DatasetDict({"train": train, "validation": train}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "one"))
    task = load_task(tmp_path / "dd")
    assert task.name == "dd" and task.labels == ["neg", "pos"] and list(task.splits) == ["train", "dev"]
    assert load_task(tmp_path / "one")["train"] == task["train"]


def test_a_save_to_disk_folder_without_datasets_installed_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sst(["good"], [1]).save_to_disk(str(tmp_path / "one"))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets now fails
    with pytest.raises(DataError, match=r"written by datasets' save_to_disk; reading it needs .*pip install datasets"):
        load_task(tmp_path / "one")


def test_json_of_number_named_columns_is_not_read_transposed(tmp_path: Path) -> None:
    # pd.read_csv(header=None).to_json(): column and index keys are both numbers, as in orient="index"
    pd = pytest.importorskip("pandas")
    pairs = [["name food", "It serves food."], ["name area", "It is in the area."], ["eat it", "Eat."]]
    pd.DataFrame(pairs).to_json(tmp_path / "g.json")
    with pytest.raises(DataError, match=r"g.json: .*columns .*or rows .*orient='records'"):
        load_task(tmp_path / "g.json", columns={"0": "source", "1": "target"})
    # named columns (or named fields in rows) say which layout it is, whatever the index
    pd.DataFrame(pairs, columns=["source", "target"], index=[5, 2, 9]).to_json(tmp_path / "c.json")
    pd.DataFrame(pairs, columns=["source", "target"], index=["a", "b", "c"]).to_json(
        tmp_path / "i.json", orient="index"
    )
    for name in ("c.json", "i.json"):
        task = load_task(tmp_path / name)
        assert [(e.text, e.label) for e in task["train"]] == [tuple(p) for p in pairs], name


def test_json_columns_keyed_by_index_are_joined_by_key_not_by_position(tmp_path: Path) -> None:
    # another tool's columns layout, its keys in another order per column: position would swap the labels
    (tmp_path / "t.json").write_text('{"text": {"a": "good", "b": "bad"}, "label": {"b": 0, "a": 1}}')
    assert [(e.text, e.label) for e in load_task(tmp_path / "t.json")["train"]] == [("good", 1), ("bad", 0)]
    (tmp_path / "t.json").write_text('{"text": {"a": "good", "b": "bad"}, "label": {"a": 1, "c": 0}}')
    with pytest.raises(DataError, match=r"t.json: column 'label' has no row 'b'"):
        load_task(tmp_path / "t.json")


def test_a_json_file_of_one_object_is_one_row(tmp_path: Path) -> None:
    # datasets' to_json of a one-row split writes one line: one row, not "expected an array"
    (tmp_path / "train.json").write_text('{"text": "good", "label": 1}\n')
    (tmp_path / "dev.json").write_text('{"source": "x", "target": "y", "references": ["y", "z"]}')
    assert load_task(tmp_path / "train.json")["train"] == [Example("good", None, 0)]
    assert load_task(tmp_path / "dev.json")["train"][0].references == ("y", "z")
    (tmp_path / "squad.json").write_text('{"version": "1.1", "data": [{"text": "good", "label": 1}]}')
    with pytest.raises(DataError, match=r"squad.json: its 'data' holds 1 row objects; save those alone"):
        load_task(tmp_path / "squad.json")


def test_predict_output_keeps_a_parquet_rows_dates_and_bytes(tmp_path: Path) -> None:
    # `predict --input x.parquet --output out.jsonl` wrote nothing: json.dumps failed on a timestamp cell after the
    # model had predicted every row
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from deltatune.cli.predict_io import read_rows, write_rows

    dates = pd.to_datetime(["2024-01-02", "2024-02-03"])
    pd.DataFrame({"text": ["good", "bad"], "date": dates, "blob": [b"x", b"y"]}).to_parquet(tmp_path / "in.parquet")
    rows = [row for row, _ in read_rows(str(tmp_path / "in.parquet"), None)]
    write_rows(str(tmp_path / "out.jsonl"), rows, ["pos", "neg"])
    first = __import__("json").loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first == {"text": "good", "date": "2024-01-02T00:00:00", "blob": "b'x'", "prediction": "pos"}


def test_parquet_files_datasets_wrote_keep_their_class_names_and_order(tmp_path: Path) -> None:
    # A hub parquet file (or `ds.to_parquet`) records its ClassLabel in the schema; the labels read as "0"/"1"
    # before, named by the ints. Now by the names, numbered in the ClassLabel's order (not sorted), and a split
    # whose ClassLabel lists them in another order is renumbered by name.
    features = D.Features({"sentence": D.Value("string"), "label": D.ClassLabel(names=["pos", "neg"])})
    D.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [0, 1, 0]}, features=features).to_parquet(
        tmp_path / "train.parquet"
    )
    other = D.Features({"sentence": D.Value("string"), "label": D.ClassLabel(names=["neg", "pos"])})
    D.Dataset.from_dict({"sentence": ["nice", "awful"], "label": [1, 0]}, features=other).to_parquet(
        tmp_path / "dev.parquet"
    )
    task = load_task(tmp_path)
    assert task.labels == ["pos", "neg"]
    assert [(e.text, e.label) for e in task.splits["train"]] == [("good", 0), ("bad", 1), ("fine", 0)]
    assert [(e.text, e.label) for e in task.splits["dev"]] == [("nice", 0), ("awful", 1)]
    (tmp_path / "meta.json").write_text('{"labels": ["neg", "pos"]}')  # meta.json still wins
    assert load_task(tmp_path).labels == ["neg", "pos"]


def test_token_level_rows_are_named_as_token_classification_not_sent_to_a_mapping(tmp_path: Path) -> None:
    """CoNLL-style rows (`tokens`, `ner_tags`): the advice to map `ner_tags=label` led to a second refusal
    ("several labels per row"). Both the unmapped and the mapped rows now say what the data is."""
    rows = '{"tokens": ["EU", "rejects"], "ner_tags": [3, 0]}\n{"tokens": ["Peter"], "ner_tags": [1]}\n'
    (tmp_path / "train.jsonl").write_text(rows)
    token_level = r"line 1: the rows hold a tag per token \('{}' and '{}'.*token classification \(NER, tagging\)"
    with pytest.raises(DataError, match=token_level.format("tokens", "ner_tags")):
        load_task(tmp_path)
    with pytest.raises(DataError, match=token_level.format("text", "label")):
        load_task(tmp_path, columns={"tokens": "text", "ner_tags": "label"})
    ds = D.Dataset.from_dict({"tokens": [["EU", "rejects"]], "ner_tags": [[3, 0]]})
    with pytest.raises(DataError, match=r"row 0: the rows hold a tag per token"):
        load_task(ds, name="conll")
    # multi-label rows (a text and a list of classes) keep their own message
    (tmp_path / "train.jsonl").write_text('{"text": "a b", "labels": ["joy", "anger"]}\n')
    with pytest.raises(DataError, match=r"is a list, not one class or number.*multi-label"):
        load_task(tmp_path)


def test_a_mapped_column_wins_over_one_of_that_name(tmp_path: Path) -> None:
    """`--columns Review=text` on a file whose header is Review,text,label trained on the `text` column."""
    (tmp_path / "train.csv").write_text("Review,text,label\ngreat film,Movie A,pos\nawful,Movie B,neg\n")
    task = load_task(tmp_path / "train.csv", columns={"Review": "text"})
    assert [e.text for e in task["train"]] == ["great film", "awful"]


def test_zero_padded_class_codes_stay_codes(tmp_path: Path) -> None:
    """Read as numbers, "01", "02", "10" became classes 1, 2, 10, and "1" and "01" merged into one class."""
    rows = "\n".join(f"item {i},{['01', '02', '10'][i % 3]}" for i in range(9))
    (tmp_path / "codes.csv").write_text("text,label\n" + rows + "\n")
    assert load_task(tmp_path / "codes.csv").labels == ["01", "02", "10"]
    rows = "\n".join(f"item {i},{['1', '01', '2'][i % 3]}" for i in range(9))
    (tmp_path / "codes.csv").write_text("text,label\n" + rows + "\n")
    assert load_task(tmp_path / "codes.csv").labels == ["01", "1", "2"]
    (tmp_path / "codes.csv").write_text("text,label\na,1\nb,2\nc,10\n")  # plain numbers: classes named by value
    assert load_task(tmp_path / "codes.csv").labels == ["1", "2", "10"]


def test_question_and_sentence_columns_are_a_pair(tmp_path: Path) -> None:
    """QNLI's `question,sentence,label` loaded as single texts: `sentence` taken, the question dropped."""
    (tmp_path / "train.csv").write_text("question,sentence,label\nwho wrote it?,Ann wrote it.,entailment\n"
                                        "when?,It rained.,not_entailment\n")  # fmt: skip
    task = load_task(tmp_path / "train.csv")
    assert task.type == "pair_classification"
    assert (task["train"][0].text, task["train"][0].text_pair) == ("who wrote it?", "Ann wrote it.")
