"""Holding out a dev split from the training rows, for data that comes without one.

A single file or a folder with only `train` cannot pick a best checkpoint or say how well a delta
does; a seeded, stratified hold-out gives it a dev split that is the same on every run with the same
seed (so `deltatune eval` can rebuild it) and keeps every class in both parts where it can.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from .tasks import DataError, Example, Task


def _pick(rows: list[int], fraction: float, rng: random.Random) -> list[int]:
    """`fraction` of the rows, rounded, but never all of them and (with two or more rows) never none."""
    count = round(fraction * len(rows))
    if len(rows) >= 2:
        count = min(max(count, 1), len(rows) - 1)
    else:
        count = 0
    return rng.sample(rows, count)


def hold_out_dev(task: Task, fraction: float, seed: int = 42) -> Task:
    """A copy of `task` whose train split lost `fraction` of its rows to a new dev split.

    Classification is stratified: each class gives its own share (at least one row when it has two
    or more), so a rare class is not left out of dev by chance. Both parts keep the file order. The
    split is recorded in the new task's `meta["dev_split"]` (fraction, seed, sizes).
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the dev fraction must be between 0 and 1 (e.g. 0.1), got {fraction}")
    if "dev" in task.splits:
        raise DataError(f"task {task.name!r} already has a dev split ({len(task.splits['dev'])} rows)")
    if "train" not in task.splits:
        raise DataError(f"task {task.name!r} has no train split to hold a dev split out of; it has {list(task.splits)}")
    train: list[Example] = task.splits["train"]
    rng = random.Random(seed)
    stratified = task.type in ("classification", "pair_classification")
    if stratified:
        by_class: dict[object, list[int]] = {}
        for i, example in enumerate(train):
            by_class.setdefault(example.label, []).append(i)
        chosen = {i for label in sorted(by_class, key=str) for i in _pick(by_class[label], fraction, rng)}
    else:
        chosen = set(_pick(list(range(len(train))), fraction, rng))
    if not chosen or len(chosen) == len(train):
        raise DataError(
            f"task {task.name!r}: {len(train)} training rows are too few to hold out a {fraction} dev split"
        )
    dev = [e for i, e in enumerate(train) if i in chosen]
    rest = [e for i, e in enumerate(train) if i not in chosen]
    rows = hashlib.sha256(repr(train).encode()).hexdigest()[:16]  # the rows held out of, in their order
    record = {"fraction": fraction, "seed": seed, "stratified": stratified, "train": len(rest), "dev": len(dev)}
    record["rows_sha"] = rows
    splits = {"train": rest, "dev": dev} | {k: v for k, v in task.splits.items() if k != "train"}
    return dataclasses.replace(task, splits=splits, meta=dict(task.meta) | {"dev_split": record})


def overlap_note(task: Task) -> str | None:
    """A note when dev or test rows repeat a training row's input (the same text, and pair), as split by hand
    from a file with duplicates: their score then measures recall of seen rows as much as learning. Among the
    collection, MPQA's short phrases (553 of its 2,000 test rows) and tweet_eval_hate (233 of 2,970) do so."""
    if "train" not in task.splits:
        return None
    seen = {(e.text, e.text_pair) for e in task["train"]}
    parts = []
    for split in ("dev", "test"):
        rows = task.splits.get(split) or []
        n = sum((e.text, e.text_pair) in seen for e in rows)
        if n >= 3 and n >= 0.01 * len(rows):
            parts.append(f"{n} of {len(rows)} {split} rows ({100 * n / len(rows):.0f}%)")
    if not parts:
        return None
    return (
        f"note: {' and '.join(parts)} have the same input as a train row; their score measures recall of seen rows "
        "as much as learning (split the data by unique text to avoid it)"
    )
