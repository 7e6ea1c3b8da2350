"""Shared by the test_data_*.py files: task folders and files written on the fly, and stand-ins for
`datasets` objects (the loader reads them by duck typing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.data import DataError, load_task

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
