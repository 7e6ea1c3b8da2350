"""deltatune.data: few-shot sampling (k per class, seeded) and holding a dev split out of train."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import SENTIMENT, make_task, write_jsonl

from deltatune.data import DataError, Example, few_shot, few_shot_task, load_task


# -- few-shot ------------------------------------------------------------------------------------
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


# -- holding out a dev split -------------------------------------------------------------------
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
    record = dict(split.meta["dev_split"])
    assert len(record.pop("rows_sha")) == 16  # the rows it was held out of, for eval to check (errors.md row 300)
    assert record == {"fraction": 0.2, "seed": 3, "stratified": True, "train": 48, "dev": 12}
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
