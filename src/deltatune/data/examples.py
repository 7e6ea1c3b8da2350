"""The one shape every task takes (a `Task` holding lists of `Example`s) and the checks that build it.

Wherever rows come from (the collection, a folder, a JSONL/CSV file, a `datasets` object: tasks.py),
they are validated here by the same rules, all at load time: a task's type and labels come from
meta.json, explicit arguments or inference over every row (`labels.py`), columns are read under
deltatune's field names first (`columns.py`), and each bad row fails with its file and line, because
a bad row found mid-training wastes an hour.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .columns import canonical, check_columns, check_mapped, map_hint
from .files import SPLIT_ALIASES, TASK_TYPES, DataError, Raw
from .labels import csv_number, infer, label_kind, padded_code, whole


@dataclass(frozen=True)
class Example:
    """One row. Classification: `label` is the class index; regression: a float; generation: the target text."""

    text: str
    text_pair: str | None = None
    label: int | float | str | None = None
    references: tuple[str, ...] = ()


@dataclass
class Task:
    """A named task with its splits; `meta` is the task's meta.json (empty for plain files)."""

    name: str
    type: str
    labels: list[str] = field(default_factory=list)
    splits: dict[str, list[Example]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    license: str = "unknown"
    # what load_task was given (a collection name, or a file/folder as an absolute path), so that a
    # saved delta can name its data and `deltatune eval` can load it again; None for datasets objects
    source: str | None = None

    @property
    def num_labels(self) -> int:
        """Size of a classification head: the number of classes, 1 for regression, 0 for generation."""
        if self.type == "regression":
            return 1
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        return any(ex.text_pair is not None for rows in self.splits.values() for ex in rows[:50])

    @property
    def metric_names(self) -> list[str]:
        from .metrics import metric_names

        return metric_names(self)

    @property
    def primary_metric(self) -> str:
        from .metrics import primary_metric

        return primary_metric(self)

    def __getitem__(self, split: str) -> list[Example]:
        key = SPLIT_ALIASES.get(split, split)
        if key not in self.splits:
            raise KeyError(f"task {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[key]

    def __repr__(self) -> str:  # the default would print every example
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Task(name={self.name!r}, type={self.type!r}, num_labels={self.num_labels}, {sizes})"


UNLABELED = (None, -1, "-1", "")  # GLUE's test files mark their hidden labels -1


def _without_unlabeled_test(raw: dict[str, list[Raw]]) -> dict[str, list[Raw]]:
    """A test split with no label in any row (Kaggle's test.csv, GLUE's -1) cannot be scored: it is left out
    with a warning, instead of failing the whole task ("missing field 'label'") so that nothing could train."""
    rows = raw.get("test")
    # a generation test file of blank targets (hidden answers) scored every prediction against "" (BLEU 0)
    if not rows or "train" not in raw or any(r.get("label") not in UNLABELED or _has_target(r) for _, r in rows):
        return raw
    where = rows[0][0].rsplit(", ", 1)[0]  # "<file>, line 2" / "dataset 'x' split 'test', row 0"
    if not where.startswith("dataset "):  # a file: predict it as it is
        how = f"deltatune predict --delta ... --input {where} --output predictions.csv"
    else:  # a `datasets` split (GLUE's test labels are -1): write it to a file first
        how = "ds['test'].to_csv('test.csv'), then deltatune predict --delta ... --input test.csv --output predictions.csv"
    warnings.warn(
        f"{where} has no labels, so it is not loaded as the test split (nothing to score); predict its rows with: {how}",
        stacklevel=5,  # load_task's caller
    )
    return {s: r for s, r in raw.items() if s != "test"}


def _has_target(row: dict) -> bool:
    """A generation row with an answer: a non-blank target (null and "" are hidden answers, as GLUE's -1 label)."""
    target = row.get("target")
    return target is not None and (not isinstance(target, str) or bool(target.strip()))


def field_text(where: str, row: dict, key: str, required: bool = True, elsewhere: bool = False) -> str | None:
    """A row's text field, or one clear line: an empty cell, a missing column and a number are each named.

    `elsewhere`: other rows of the split have `key`, so this row's cell is empty (a CSV drops empty cells)."""
    if key not in row or row[key] is None:
        if required and (key in row or elsewhere):  # the column is there, this cell is empty
            raise DataError(
                f"{where}: {key!r} is empty (a blank cell or null); give every row its {key}, or drop the row"
            )
        if required:
            raise DataError(f"{where}: missing field {key!r}; {map_hint(sorted(row), key)}")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _examples(rows: list[Raw], task_type: str, labels: list[str], class_indices: bool = False) -> list[Example]:
    out = []
    seen: tuple[str, str] | None = None  # (kind, where) of the first classification label, for mixed-type errors
    index = {name: i for i, name in enumerate(labels)}
    # Given labels (meta.json, labels=[...]) make an int a class index; if the names are themselves numbers
    # that are not the indices (["1", "0"]), a CSV "1" (a name) and a JSONL 1 (an index) would silently
    # be different classes, so an int is refused there rather than guessed.
    numeric_names = (
        not class_indices
        and labels != [str(i) for i in range(len(labels))]
        and all(name.lstrip("-").isdigit() for name in labels)
    )
    present = {key for _, row in rows for key in row}  # a key some row has is a column: where it lacks, a cell is empty
    for where, row in rows:
        if task_type == "generation":
            source = field_text(where, row, "source", elsewhere="source" in present)
            target = field_text(where, row, "target", elsewhere="target" in present)
            if not target.strip():  # trained on EOS alone, or scored against "", where a blank CSV cell is refused
                raise DataError(f"{where}: 'target' is blank; give every row its target, or drop the row")
            refs = row.get("references") or [target]
            if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
                raise DataError(f"{where}: 'references' must be a list of strings")
            out.append(Example(source, None, target, tuple(refs)))
            continue
        text = field_text(where, row, "text", elsewhere="text" in present)
        # a pair task's blank second text is refused as a blank text is: read as a single text, the row was
        # encoded one way alone in its batch and another beside paired rows
        pair = field_text(where, row, "text_pair", required="text_pair" in present, elsewhere=True)
        if "label" not in row and "label" not in present:
            raise DataError(f"{where}: missing field 'label'; {map_hint(sorted(row), 'label')}")
        if row.get("label") is None:
            raise DataError(
                f"{where}: label is empty (a blank cell or null); give every row a label (unlabelled rows have no place "
                "in a split)"
            )
        label = row["label"] if task_type == "regression" else whole(row["label"])
        kind = label_kind(label)
        if task_type == "regression":
            if kind == "str":
                try:
                    label = float(label)
                except ValueError:
                    raise DataError(f"{where}: non-numeric regression label {row['label']!r}") from None
            elif kind not in ("int", "float"):
                raise DataError(f"{where}: non-numeric regression label {row['label']!r}")
            if not math.isfinite(label):
                raise DataError(f"{where}: regression label {row['label']!r} is not a finite number")
            out.append(Example(text, pair, float(label)))
            continue
        if seen is None:
            seen = (kind, where)
        elif kind != seen[0]:
            raise DataError(
                f"{where}: mixed label types: {kind} label {label!r} here but {seen[0]} label at {seen[1]}; "
                "use either class indices or label strings throughout"
            )
        if kind == "str":
            if label not in index:
                raise DataError(f"{where}: unknown label {label!r}; the task's labels are {labels}")
            label = index[label]
        elif kind == "int":
            if numeric_names:
                raise DataError(
                    f"{where}: label {label} is ambiguous: the labels {labels} are numbers but not 0..{len(labels) - 1} "
                    f"in that order, so {label} could be a class index or a class name; write each label as its name "
                    f'(in JSONL a string: "{label}"), or list meta.json\'s "labels" as {[str(i) for i in range(len(labels))]}'
                )
            if label == -1 and class_indices:  # a datasets ClassLabel's missing value
                raise DataError(
                    f"{where}: label -1 marks a missing label (as in GLUE's hidden test labels); drop those rows, "
                    "e.g. ds.filter(lambda row: row['label'] != -1)"
                )
            if not 0 <= label < len(labels):
                raise DataError(f"{where}: label index {label} out of range for {len(labels)} labels {labels}")
        else:
            raise DataError(
                f"{where}: a classification label must be a class index (int) or a label string, got {kind} {label!r}"
            )
        out.append(Example(text, pair, label))
    return out


def _check_unseen(raw: dict[str, list[Raw]], splits: dict[str, list[Example]], labels: list[str]) -> None:
    """Inferred classes come from every split, so a dev/test label that training never shows (a typo,
    "Pos" beside "pos", a stray space) would silently become a class the model can never learn."""
    if "train" not in splits:
        return
    trained = {ex.label for ex in splits["train"]}
    for split, examples in splits.items():
        for (where, _), ex in zip(raw[split], examples, strict=True):
            if ex.label not in trained:
                raise DataError(
                    f"{where}: label {labels[ex.label]!r} never occurs in the train split (its labels: "
                    f"{sorted(labels[i] for i in trained)}); fix the label, or list every class in meta.json "
                    '("labels": [...]) if the train split really lacks it'
                )


def _warn_empty_texts(raw: dict[str, list[Raw]], splits: dict[str, list[Example]]) -> None:
    """Rows whose text is empty (a blank CSV cell) train on the label alone; many of them usually mean the
    wrong column was read as the text, which no error would reveal."""
    for split, examples in splits.items():
        empty = [where for (where, _), ex in zip(raw[split], examples, strict=True) if not ex.text.strip()]
        if empty:
            warnings.warn(
                f"{len(empty)} of {len(examples)} rows of {split} have an empty text (first: {empty[0]}); they "
                "carry nothing but their label: check that the text column is the right one (--columns)",
                stacklevel=5,  # load_task's caller
            )


def _build(
    name: str,
    raw: dict[str, list[Raw]],
    meta: dict,
    columns: Mapping[str, str] | None,
    from_csv: dict[str, bool],
    task_type: str | None = None,
    labels: Sequence[str] | None = None,
    class_indices: bool = False,
) -> Task:
    """Validate raw rows of all splits into a Task; meta.json wins over inference, explicit arguments over both.

    `class_indices`: the labels are a `datasets` ClassLabel's names, so its ints are indices for sure.
    `columns` (else meta.json's "columns") renames the user's fields and is kept in `meta`, so that a
    delta's `eval` reads the data the way its training did."""
    columns = check_columns(columns if columns is not None else meta.get("columns"))
    if columns:
        meta = meta | {"columns": dict(columns)}
        check_mapped(columns, (r for rows in raw.values() for _, r in rows), f"task {name!r}")
    raw = {s: [(w, canonical(r, columns)) for w, r in rows] for s, rows in raw.items()}
    raw = _without_unlabeled_test(raw)
    task_type = task_type or meta.get("type")
    labels = list(labels) if labels is not None else meta.get("labels")
    inferred = labels is None
    csv_rows = [row for split, rows in raw.items() if from_csv[split] for _, row in rows if "label" in row]
    if not any(padded_code(row["label"]) for row in csv_rows):  # "01", "02", "10" are codes: kept as written
        for row in csv_rows:
            row["label"] = csv_number(row["label"], [str(x) for x in labels or []])
    for where, row in (r for rows in raw.values() for r in rows):  # before inference: a NaN made the task regression
        nan = row.get("label")
        if (isinstance(nan, float) and math.isnan(nan)) or (isinstance(nan, str) and nan.strip().lower() == "nan"):
            if str(nan) not in (labels or ()):
                raise DataError(
                    f"{where}: label is {nan!r}, a missing value (pandas and json.dumps write one so); give every row "
                    "a label, or drop the row"
                )
    if task_type is None:
        every = [r for rows in raw.values() for r in rows]
        if labels is None:
            task_type, labels = infer(every)
        else:
            task_type = "pair_classification" if any("text_pair" in r for _, r in every) else "classification"
    if task_type not in TASK_TYPES:
        raise DataError(f"task {name!r}: unknown type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    if task_type in ("classification", "pair_classification"):
        if labels is None:
            _, labels = infer([r for rows in raw.values() for r in rows], classes=True)
        if not labels:
            raise DataError(f"task {name!r}: a {task_type} task needs labels (meta.json 'labels' or labels=[...])")
    else:
        labels = []
    labels = [str(x) for x in labels]
    if inferred and task_type in ("classification", "pair_classification"):
        # inferred numeric classes are named by their values (labels 1..3 are classes "1", "2", "3"), so
        # each row maps by name, never as an index into a list that starts at another number
        for rows in raw.values():
            for _, row in rows:
                label = whole(row.get("label"))
                if label_kind(label) == "int":
                    row["label"] = str(label)
    splits = {s: _examples(rows, task_type, labels, class_indices) for s, rows in raw.items()}
    _warn_empty_texts(raw, splits)
    if inferred and task_type in ("classification", "pair_classification"):
        _check_unseen(raw, splits, labels)
    meta = dict(meta) or {"name": name, "type": task_type, "labels": labels}
    return Task(name, task_type, labels, splits, meta, str(meta.get("license") or "unknown"))
