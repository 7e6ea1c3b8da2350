"""deltatune.data: listing a folder of tasks, and the shared task collection (the integration tests read the real data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import SENTIMENT, make_task

from deltatune.data import DataError, data_root, format_task_table, list_tasks, load_task


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


# -- the shared collection -----------------------------------------------------------------------
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
