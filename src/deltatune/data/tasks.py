"""Load NLP tasks into one small, validated shape: a `Task` holding lists of `Example`s per split.

The shared collection (`<task>/{train,dev,test}.jsonl` + `meta.json`) is the main source, but a
folder in the same format, a single JSONL/CSV/TSV file or a Hugging Face `datasets` object load the
same way, so training code never special-cases where data came from. Everything is checked at load
time (by the rules in examples.py) and every error names the file and line, because a bad row found
mid-training wastes an hour.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .collection import _resolve_name, candidate_roots, data_root, format_task_table, list_tasks
from .examples import Example, Task, _build
from .files import (
    ENV_VAR,
    FILE_SUFFIXES,
    SPLIT_ALIASES,
    SPLITS,
    TASK_TYPES,
    TEXT_SUFFIXES,
    DataError,
    Raw,
    _read_file,
    _read_meta,
    _split_file,
    parquet_class_names,
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


def _norm_splits(splits: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if splits is None:
        return None
    if isinstance(splits, str):
        splits = (splits,)
    return tuple(SPLIT_ALIASES.get(s, s) for s in splits)


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "__iter__") and not isinstance(obj, Mapping)


def _dataset_rows(ds: Any, label: str) -> list[Raw]:
    """A `datasets` object's rows as Python values: a formatted one (`with_format("numpy")`, "torch",
    "pandas") would yield numpy strings, tensors or whole DataFrames, so it is read unformatted."""
    if callable(getattr(ds, "with_format", None)):
        ds = ds.with_format(None)
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


def _split_labels(name: str, parts: dict[str, Any], raw: dict[str, list], columns: Mapping[str, str] | None) -> Any:
    """The class names of the splits' ClassLabels (any split may carry them). A split whose ClassLabel
    lists the same names in another order has its ints renumbered by name; other names are refused."""
    named = {s: n for s, ds in parts.items() if (n := _dataset_labels(ds, columns)) is not None}
    if not named:
        return None
    first, labels = next(iter(named.items()))
    key = next((k for k, v in (columns or {}).items() if v == "label"), None)
    for split, names in named.items():
        if names == labels:
            continue
        if sorted(names) != sorted(labels):
            raise DataError(
                f"dataset {name!r}: split {split!r} has the classes {names}, split {first!r} has {labels}; "
                "give every split the same ClassLabel (datasets' cast_column) or pass labels=[...]"
            )
        for _, row in raw[split]:  # the same classes numbered in another order: index by name
            col = key if key in row else "label" if "label" in row else "labels"
            if isinstance(row.get(col), int) and 0 <= row[col] < len(names):
                row[col] = labels.index(names[row[col]])
    return labels


def _parquet_labels(
    name: str, files: dict[str, Path], raw: dict[str, list], meta: dict, columns: Mapping[str, str] | None, kw: dict
) -> None:
    """Parquet files `datasets` wrote carry their ClassLabel names: use them as a `datasets` object's are,
    unless meta.json or `labels=` name the classes."""
    if kw.get("labels") is not None or meta.get("labels"):
        return
    parts = {
        s: SimpleNamespace(features=f)
        for s, p in files.items()
        if p.suffix == ".parquet"
        if (f := parquet_class_names(p))
    }
    if parts:
        kw["labels"] = _split_labels(name, parts, raw, columns)
        kw["class_indices"] = kw["labels"] is not None


def _load_saved_dataset(
    path: Path, name: str | None, splits: tuple[str, ...] | None, columns: Mapping[str, str] | None, kw: dict
) -> Task:
    """A folder `datasets`' `save_to_disk` wrote (a DatasetDict's dataset_dict.json, or one Dataset's state.json)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path} is a folder written by datasets' save_to_disk; reading it needs the datasets library "
            "(pip install datasets), or export its splits as train/dev/test .jsonl files"
        ) from None
    return _load_dataset_obj(datasets.load_from_disk(str(path)), name or path.name, splits, columns, **kw)


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
        kw["labels"] = _split_labels(name, parts, raw, columns)
        kw["class_indices"] = kw["labels"] is not None
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
    `source`/`target` rows are generation, float labels regression, int, whole-number float (1.0) or
    string labels classification, the classes being the values that occur (numbers sorted
    numerically). With the default `splits`, a folder's missing splits are skipped; splits named
    explicitly must exist. A single file is one split, "train" unless
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
        name = name or (path.parent.name if meta else path.stem)
        _parquet_labels(name, {target[0]: path}, raw, meta, columns, kw)
        return _build(name, raw, meta, columns, {target[0]: path.suffix in TEXT_SUFFIXES}, **kw)
    meta = _read_meta(path / "meta.json") if (path / "meta.json").exists() else {}
    files = {}
    for split in wanted or SPLITS:
        found = _split_file(path, split)
        if found is not None:
            files[split] = found
        elif explicit:
            present = sorted(p.name for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
            raise DataError(
                f"{path}: no {split}{'/'.join(FILE_SUFFIXES)} for split {split!r}; found {present or 'no data files'}"
            )
    if not files:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _load_saved_dataset(path, name, wanted if explicit else None, columns, kw)
        raise DataError(f"{path}: no train/dev/test {'/'.join(FILE_SUFFIXES)} files")
    raw = {s: _read_file(f) for s, f in files.items()}
    _parquet_labels(name or path.name, files, raw, meta, columns, kw)
    return _build(
        name or path.name,
        raw,
        meta,
        columns,
        {s: f.suffix in TEXT_SUFFIXES for s, f in files.items()},
        **kw,
    )
