"""The one shape every task takes (a `Task` holding lists of `Example`s) and the checks that build it.

Wherever rows come from (the collection, a folder, a JSONL/CSV file, a `datasets` object: tasks.py),
they are validated here by the same rules, all at load time: a task's type and labels come from
meta.json, explicit arguments or inference over every row, and each bad row fails with its file and
line, because a bad row found mid-training wastes an hour.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .files import COLUMN_ALIASES, SPLIT_ALIASES, TASK_TYPES, DataError, Raw


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


def canonical(row: dict, columns: Mapping[str, str] | None) -> dict:
    """A row with its fields under the names deltatune reads (`columns` first, then the common aliases)."""
    return _canonical(row, columns)


def _canonical(row: dict, columns: Mapping[str, str] | None) -> dict:
    if columns:
        row = {columns.get(k, k): v for k, v in row.items()}
    label = row.get("label")
    if label is not None and not isinstance(label, str) and hasattr(label, "item"):  # numpy/torch scalars
        row["label"] = label.item()
    for key, aliases in COLUMN_ALIASES.items():
        if key not in row:
            for alias in aliases:
                if alias in row:
                    row[key] = row[alias]
                    break
    return row


def _csv_number(value: Any, labels: Sequence[str]) -> Any:
    """A CSV cell is always a string: keep it if it names a label, else read it as an int or float."""
    if not isinstance(value, str) or value in labels:
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _kind(label: Any) -> str:
    if isinstance(label, bool):
        return "bool"
    if isinstance(label, int):
        return "int"
    if isinstance(label, float):
        return "float"
    if isinstance(label, str):
        return "str"
    return type(label).__name__


# More distinct whole-number float labels than this read as regression targets, not classes: ambiguous.
MAX_WHOLE_CLASSES = 20


def _whole(label: Any) -> Any:
    """1.0 -> 1: pandas writes an int column holding a NaN as floats, so `1.0` is a class written as a float."""
    if isinstance(label, float) and math.isfinite(label) and label.is_integer():
        return int(label)
    return label


def _indices(values: set[int]) -> bool:
    """Whether integers are class numbers, 0..n-1 or 1..n (77 intents), not scores or ages (18..90 with gaps)."""
    return min(values) in (0, 1) and max(values) - min(values) + 1 == len(values)


def _name_order(names: Iterable[str]) -> list[str]:
    """Class names sorted numerically when every name is a number ("2" before "10"), else as text.
    The order is the class index, so it must not depend on how a file happened to spell its numbers."""
    names = set(names)
    try:
        values = {name: float(name) for name in names}
    except ValueError:
        return sorted(names)
    if not all(math.isfinite(v) for v in values.values()):
        return sorted(names)
    return sorted(names, key=lambda name: (values[name], name))


def _infer(rows: list[Raw], classes: bool = False) -> tuple[str, list[str]]:
    """Task type and label names for data without meta.json, judged from all rows of all splits.

    Numeric classes are the values that occur, named by their value ("1", "2", "3": no unused "0"
    class) and ordered numerically; `_build` then maps each row by that name. Whole-number floats
    (1.0/0.0) are classes like the ints they stand for: the same labels written as 1/0 are already
    classification, and the float spelling is an artefact of pandas (an int column with a NaN). Only
    when there are many distinct whole values (more than MAX_WHOLE_CLASSES) could they as well be
    regression targets; then we refuse and ask for meta.json's "type" rather than guess (`classes`: the
    type says classification, so they are classes whatever their count). Many distinct ints are
    classes when they number them (0..n-1 or 1..n: intent ids); otherwise (scores, years, ages) the
    same question is asked.
    """
    if any("source" in r or "target" in r for _, r in rows) and not any("text" in r for _, r in rows):
        return "generation", []
    pair = any("text_pair" in r for _, r in rows)
    first: dict[str, str] = {}
    values = []
    for where, row in rows:
        if row.get("label") is None:  # null is a missing label: _examples names the row
            continue
        label = row["label"]
        kind = _kind(label)
        first.setdefault(kind, where)
        values.append(label)
    if "str" in first and len(first) > 1:
        other = next(k for k in first if k != "str")
        raise DataError(
            f"{first[other]}: mixed label types: {other} label here but str label at {first['str']}; "
            "use either class indices or label strings throughout"
        )
    if "bool" in first:
        raise DataError(f"{first['bool']}: boolean label; use 0/1 or a label string")
    kind = "pair_classification" if pair else "classification"
    if "float" in first:
        whole = {_whole(v) for v in values}
        if not all(isinstance(v, int) for v in whole):
            return "regression", []
        if len(whole) > MAX_WHOLE_CLASSES and not classes:
            raise DataError(
                f"{first['float']}: {len(whole)} distinct whole-number labels ({min(whole)}..{max(whole)}) read as "
                'either classes or regression targets; say which in meta.json: "type": "classification" or "regression"'
            )
        return kind, _name_order(str(v) for v in whole)
    if "str" in first:
        return kind, _name_order(values)
    if "int" in first:
        ints = set(values)
        if len(ints) > MAX_WHOLE_CLASSES and not classes and not _indices(ints):
            raise DataError(
                f"{first['int']}: {len(ints)} distinct integer labels ({min(ints)}..{max(ints)}, not class numbers "
                '0..n-1 or 1..n) read as either classes or regression targets; say which in meta.json: "type": '
                '"classification" or "regression"'
            )
        return kind, _name_order(str(v) for v in values)
    raise DataError(
        f"{rows[0][0]}: no 'label' (classification) or 'source'/'target' (generation) field in any row; "
        + map_hint(sorted({k for _, r in rows[:1000] for k in r}), "label")
    )


FIELDS = ("text", "text_pair", "label", "source", "target", "references")
UNLABELED = (None, -1, "-1", "")  # GLUE's test files mark their hidden labels -1


def _without_unlabeled_test(raw: dict[str, list[Raw]]) -> dict[str, list[Raw]]:
    """A test split with no label in any row (Kaggle's test.csv, GLUE's -1) cannot be scored: it is left out
    with a warning, instead of failing the whole task ("missing field 'label'") so that nothing could train."""
    rows = raw.get("test")
    if not rows or "train" not in raw or any(r.get("label") not in UNLABELED or "target" in r for _, r in rows):
        return raw
    where = rows[0][0].rsplit(", line", 1)[0]
    warnings.warn(
        f"{where} has no labels, so it is not loaded as the test split (nothing to score); "
        f"predict its rows with: deltatune predict --delta ... --input {where} --output predictions.csv",
        stacklevel=5,  # load_task's caller
    )
    return {s: r for s, r in raw.items() if s != "test"}


def check_columns(columns: Any) -> dict[str, str] | None:
    """A {their column: our field} mapping, or one line saying what a mapping must look like."""
    if not columns:
        return None
    if not isinstance(columns, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in columns.items()
    ):
        raise DataError(f'columns must map a column name to a field name, e.g. {{"Review": "text"}}; got {columns!r}')
    wrong = sorted(v for v in columns.values() if v not in FIELDS)
    if wrong:
        raise DataError(f"columns: {wrong[0]!r} is not a field deltatune reads; map columns to {', '.join(FIELDS)}")
    return dict(columns)


def map_hint(fields: list[str], wanted: str) -> str:
    """How to say which of a user's columns is `wanted`: rename it, or map it (CLI, API, meta.json)."""
    have = ", ".join(repr(f) for f in fields[:8]) or "none"
    words = _LIKELY.get(wanted, ())
    likely = [f for f in fields if any(w in f.lower() for w in words)]
    other = (likely or fields[-1:] if wanted == "label" else likely or fields[:1]) or ["COLUMN"]
    return (
        f"the rows have {have}: rename a column to {wanted!r}, or map it, e.g. --columns {other[0]}={wanted} "
        f'(load_task(..., columns={{"{other[0]}": "{wanted}"}}); "columns" in meta.json)'
    )


# words in column names that suggest a field, for the example in `map_hint` only
_LIKELY = {
    "label": ("label", "class", "sentiment", "category", "target", "tag", "intent", "score"),
    "text": ("text", "review", "sentence", "comment", "content", "tweet", "body", "message", "utterance"),
}


def _text(where: str, row: dict, key: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
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
    for where, row in rows:
        if task_type == "generation":
            source = _text(where, row, "source")
            target = _text(where, row, "target")
            refs = row.get("references") or [target]
            if not isinstance(refs, (list, tuple)) or not all(isinstance(r, str) for r in refs):
                raise DataError(f"{where}: 'references' must be a list of strings")
            out.append(Example(source, None, target, tuple(refs)))
            continue
        text = _text(where, row, "text")
        pair = _text(where, row, "text_pair", required=False)
        if "label" not in row:
            raise DataError(f"{where}: missing field 'label'; {map_hint(sorted(row), 'label')}")
        if row["label"] is None:
            raise DataError(
                f"{where}: label is null; give every row a label (unlabelled rows have no place in a split)"
            )
        label = row["label"] if task_type == "regression" else _whole(row["label"])
        kind = _kind(label)
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
    raw = {s: [(w, _canonical(r, columns)) for w, r in rows] for s, rows in raw.items()}
    raw = _without_unlabeled_test(raw)
    task_type = task_type or meta.get("type")
    labels = list(labels) if labels is not None else meta.get("labels")
    inferred = labels is None
    for split, rows in raw.items():
        if from_csv[split]:
            for _, row in rows:
                if "label" in row:
                    row["label"] = _csv_number(row["label"], [str(x) for x in labels or []])
    if task_type is None:
        every = [r for rows in raw.values() for r in rows]
        if labels is None:
            task_type, labels = _infer(every)
        else:
            task_type = "pair_classification" if any("text_pair" in r for _, r in every) else "classification"
    if task_type not in TASK_TYPES:
        raise DataError(f"task {name!r}: unknown type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    if task_type in ("classification", "pair_classification"):
        if labels is None:
            _, labels = _infer([r for rows in raw.values() for r in rows], classes=True)
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
                label = _whole(row.get("label"))
                if _kind(label) == "int":
                    row["label"] = str(label)
    splits = {s: _examples(rows, task_type, labels, class_indices) for s, rows in raw.items()}
    if inferred and task_type in ("classification", "pair_classification"):
        _check_unseen(raw, splits, labels)
    meta = dict(meta) or {"name": name, "type": task_type, "labels": labels}
    return Task(name, task_type, labels, splits, meta, str(meta.get("license") or "unknown"))
