"""Load NLP tasks into one small, validated shape: a `Task` holding lists of `Example`s per split.

The shared collection (`<task>/{train,dev,test}.jsonl` + `meta.json`) is the main source, but a
folder in the same format, a single JSONL/CSV/TSV file or a Hugging Face `datasets` object load the
same way, so training code never special-cases where data came from. Everything is checked at load
time and every error names the file and line, because a bad row found mid-training wastes an hour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .collection import _resolve_name, candidate_roots, data_root, format_task_table, list_tasks
from .files import (
    COLUMN_ALIASES,
    ENV_VAR,
    FILE_SUFFIXES,
    SPLIT_ALIASES,
    SPLITS,
    TASK_TYPES,
    DataError,
    Raw,
    _read_file,
    _read_meta,
    _split_file,
)

__all__ = [
    "ENV_VAR",
    "SPLITS",
    "TASK_TYPES",
    "DataError",
    "Example",
    "Task",
    "candidate_roots",
    "data_root",
    "format_task_table",
    "list_tasks",
    "load_task",
]


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


def _infer(rows: list[Raw]) -> tuple[str, list[str]]:
    """Task type and label names for data without meta.json, judged from all rows of all splits."""
    if any("source" in r or "target" in r for _, r in rows) and not any("text" in r for _, r in rows):
        return "generation", []
    pair = any("text_pair" in r for _, r in rows)
    first: dict[str, str] = {}
    values = []
    for where, row in rows:
        if "label" not in row:
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
    if "float" in first:
        return "regression", []
    if "str" in first:
        return ("pair_classification" if pair else "classification"), sorted(set(values))
    if "int" in first:
        top = max(values)
        return ("pair_classification" if pair else "classification"), [str(i) for i in range(top + 1)]
    raise DataError(f"{rows[0][0]}: no 'label' (classification) or 'source'/'target' (generation) field in any row")


def _text(where: str, row: dict, key: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r} (row has {', '.join(sorted(row)) or 'no fields'})")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _examples(rows: list[Raw], task_type: str, labels: list[str]) -> list[Example]:
    out = []
    seen: tuple[str, str] | None = None  # (kind, where) of the first classification label, for mixed-type errors
    index = {name: i for i, name in enumerate(labels)}
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
        if "label" not in row or row["label"] is None:
            raise DataError(f"{where}: missing field 'label' (row has {', '.join(sorted(row))})")
        label = row["label"]
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
            if not 0 <= label < len(labels):
                raise DataError(f"{where}: label index {label} out of range for {len(labels)} labels {labels}")
        else:
            raise DataError(
                f"{where}: a classification label must be a class index (int) or a label string, got {kind} {label!r}"
            )
        out.append(Example(text, pair, label))
    return out


def _build(
    name: str,
    raw: dict[str, list[Raw]],
    meta: dict,
    columns: Mapping[str, str] | None,
    from_csv: dict[str, bool],
    task_type: str | None = None,
    labels: Sequence[str] | None = None,
) -> Task:
    """Validate raw rows of all splits into a Task; meta.json wins over inference, explicit arguments over both."""
    raw = {s: [(w, _canonical(r, columns)) for w, r in rows] for s, rows in raw.items()}
    task_type = task_type or meta.get("type")
    labels = list(labels) if labels is not None else meta.get("labels")
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
            _, labels = _infer([r for rows in raw.values() for r in rows])
        if not labels:
            raise DataError(f"task {name!r}: a {task_type} task needs labels (meta.json 'labels' or labels=[...])")
    else:
        labels = []
    labels = [str(x) for x in labels]
    splits = {s: _examples(rows, task_type, labels) for s, rows in raw.items()}
    meta = dict(meta) or {"name": name, "type": task_type, "labels": labels}
    return Task(name, task_type, labels, splits, meta, str(meta.get("license") or "unknown"))


# ----------------------------------------------------------------------------- public entry points


def _norm_splits(splits: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if splits is None:
        return None
    if isinstance(splits, str):
        splits = (splits,)
    return tuple(SPLIT_ALIASES.get(s, s) for s in splits)


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "__iter__") and not isinstance(obj, Mapping)


def _dataset_rows(ds: Any, label: str) -> list[Raw]:
    rows = []
    for i, row in enumerate(ds):
        if not isinstance(row, Mapping):
            raise DataError(f"{label}, row {i}: expected a dict row, got {type(row).__name__}")
        rows.append((f"{label}, row {i}", dict(row)))
    if not rows:
        raise DataError(f"{label}, row 0: empty dataset (no rows)")
    return rows


def _dataset_labels(ds: Any, columns: Mapping[str, str] | None) -> list[str] | None:
    """Class names of a `datasets` ClassLabel column, if the object carries them."""
    features = getattr(ds, "features", None) or {}
    names = [k for k, v in (columns or {}).items() if v == "label"] + ["label", "labels"]
    for key in names:
        feature = features.get(key) if isinstance(features, Mapping) else None
        if feature is not None and getattr(feature, "names", None):
            return list(feature.names)
    return None


def _load_dataset_obj(
    obj: Any, name: str | None, splits: tuple[str, ...] | None, columns: Mapping[str, str] | None, **kw: Any
) -> Task:
    name = name or getattr(obj, "builder_name", None) or getattr(getattr(obj, "info", None), "builder_name", None)
    name = name or "dataset"
    if isinstance(obj, Mapping):
        available = {SPLIT_ALIASES.get(k, k): v for k, v in obj.items()}
        wanted = splits or tuple(available)
        missing = [s for s in wanted if s not in available]
        if missing:
            raise DataError(f"dataset {name!r} has no split(s) {missing}; it has {list(obj)}")
        parts = {s: available[s] for s in wanted}
    else:
        if splits and len(splits) != 1:
            raise DataError(f"a single dataset is one split; pass splits=('train',) or a DatasetDict, not {splits}")
        parts = {(splits or ("train",))[0]: obj}
    raw = {s: _dataset_rows(ds, f"dataset {name!r} split {s!r}") for s, ds in parts.items()}
    if kw.get("labels") is None:
        first = next(iter(parts.values()))
        kw["labels"] = _dataset_labels(first, columns)
    return _build(name, raw, {}, columns, dict.fromkeys(raw, False), **kw)


def load_task(
    source: Any,
    splits: Sequence[str] | str | None = SPLITS,
    *,
    name: str | None = None,
    root: str | os.PathLike | None = None,
    task_type: str | None = None,
    labels: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
) -> Task:
    """Load a task by collection name ("sst2"), folder, `.jsonl`/`.csv`/`.tsv` file or `datasets` object.

    Folders: `{train,dev,test}.{jsonl,csv,tsv}` (`validation` is read as `dev`) plus an optional
    `meta.json` giving `type`, `labels` and `license`. Without one, the type and labels are inferred:
    `source`/`target` rows are generation, float labels regression, int or string labels
    classification (string labels sorted). With the default `splits`, a folder's missing splits are
    skipped; splits named explicitly must exist. A single file is one split, "train" unless
    `splits=("test",)` says otherwise (a meta.json beside it still applies). `task_type` and
    `labels` override meta.json and inference; `columns` renames fields, e.g. `{"sentence": "text"}`.
    `datasets` objects: a DatasetDict (or dict of Datasets) gives its splits, a Dataset one split;
    ClassLabel names become the labels, and GLUE-style columns (sentence1/sentence2, premise/hypothesis,
    question1/question2, score) are read as text/text_pair/label when the canonical ones are absent.
    """
    kw = {"task_type": task_type, "labels": labels}
    wanted = _norm_splits(splits)
    explicit = splits is not SPLITS and splits is not None
    if _is_dataset(source) or (isinstance(source, Mapping) and source and all(_is_dataset(v) for v in source.values())):
        return _load_dataset_obj(source, name, wanted if explicit else None, columns, **kw)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot load a task from a {type(source).__name__}; pass a name, path or datasets object")
    path = Path(source).expanduser()
    origin = str(path.resolve())
    if not path.exists():
        if path.suffix in FILE_SUFFIXES or os.sep in str(source) or (os.altsep and os.altsep in str(source)):
            raise DataError(f"{path}: no such file or folder")
        path = _resolve_name(str(source), Path(root) if root is not None else None)
        origin = str(source) if root is None else str(path)
    task = _load_path(path, name, wanted, explicit, columns, kw)
    task.source = origin
    return task


def _load_path(
    path: Path,
    name: str | None,
    wanted: tuple[str, ...] | None,
    explicit: bool,
    columns: Mapping[str, str] | None,
    kw: dict[str, Any],
) -> Task:
    if path.is_file():
        target = wanted if explicit and wanted else ("train",)
        if len(target) != 1:
            raise DataError(f"{path} is a single file, so one split; pass splits=('train',) or a folder")
        meta = _read_meta(path.parent / "meta.json") if (path.parent / "meta.json").exists() else {}
        raw = {target[0]: _read_file(path)}
        return _build(
            name or (path.parent.name if meta else path.stem),
            raw,
            meta,
            columns,
            {target[0]: path.suffix != ".jsonl"},
            **kw,
        )
    meta = _read_meta(path / "meta.json") if (path / "meta.json").exists() else {}
    files = {}
    for split in wanted or SPLITS:
        found = _split_file(path, split)
        if found is not None:
            files[split] = found
        elif explicit:
            present = sorted(p.name for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
            raise DataError(
                f"{path}: no {split}.jsonl/.csv/.tsv for split {split!r}; found {present or 'no data files'}"
            )
    if not files:
        raise DataError(f"{path}: no train/dev/test .jsonl/.csv/.tsv files")
    raw = {s: _read_file(f) for s, f in files.items()}
    return _build(
        name or path.name,
        raw,
        meta,
        columns,
        {s: f.suffix != ".jsonl" for s, f in files.items()},
        **kw,
    )
