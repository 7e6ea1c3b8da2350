"""Few-shot subsets, sampled as LM-BFF (Gao et al. 2021) does: k examples per class, one seed per run.

A seeded shuffle followed by taking the first k of each class is deterministic for a seed and
independent of Python's hash seed, and the shuffled order mixes the classes, which training wants.
Regression and generation have no classes, so k means k examples in total there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .tasks import DataError, Example, Task


def _is_classification(examples: Sequence[Example]) -> bool:
    return bool(examples) and all(isinstance(e.label, int) and not isinstance(e.label, bool) for e in examples)


def few_shot(
    examples: Sequence[Example] | Task,
    k: int,
    seed: int = 0,
    *,
    labels: Sequence[str] | None = None,
    per_class: bool | None = None,
) -> list[Example]:
    """k examples per class (classification) or k in total (regression, generation), chosen by `seed`.

    `examples` may be a Task (its train split is sampled, its labels name the classes). With `labels`
    every class must be present, not only those seen; `per_class` overrides the choice made from the
    label types (int labels: per class).
    """
    if isinstance(examples, Task):
        task = examples
        labels = labels if labels is not None else task.labels
        if per_class is None:
            per_class = task.type in ("classification", "pair_classification")
        examples = task["train"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    examples = list(examples)
    if per_class is None:
        per_class = _is_classification(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if not per_class:
        if len(examples) < k:
            raise DataError(f"asked for k={k} examples but only {len(examples)} are available")
        return [examples[i] for i in order[:k]]
    classes = range(len(labels)) if labels else sorted({e.label for e in examples})
    counts = {c: 0 for c in classes}
    for e in examples:
        if e.label not in counts:
            raise DataError(f"example label {e.label!r} is not one of the classes {list(counts)}")
        counts[e.label] += 1
    short = [c for c, n in counts.items() if n < k]
    if short:
        names = ", ".join(f"{labels[c] if labels else c!r} (label {c}): {counts[c]}" for c in short)
        raise DataError(f"k={k} per class but these classes have fewer examples: {names}")
    taken = dict.fromkeys(counts, 0)
    out = []
    for i in order:
        label = examples[i].label
        if taken[label] < k:
            taken[label] += 1
            out.append(examples[i])
    return out


def few_shot_task(task: Task, k: int, seed: int = 0, dev_k: int | None = None) -> Task:
    """A copy of `task` whose train and dev are disjoint k-shot samples of its train split; test is unchanged.

    LM-BFF selects models on a few-shot dev set of the same size as the training set, since a full dev
    set would be labelled data a truly few-shot learner does not have.
    """
    dev_k = k if dev_k is None else dev_k
    train = few_shot(task, k, seed)
    chosen = {id(e) for e in train}
    rest = [e for e in task["train"] if id(e) not in chosen]
    per_class = task.type in ("classification", "pair_classification")
    dev = few_shot(rest, dev_k, seed, labels=task.labels or None, per_class=per_class) if dev_k else []
    splits = {"train": train, "dev": dev}
    splits.update({s: v for s, v in task.splits.items() if s not in ("train", "dev")})
    meta = {**task.meta, "few_shot": {"k": k, "dev_k": dev_k, "seed": seed}}
    return Task(f"{task.name}-k{k}-s{seed}", task.type, list(task.labels), splits, meta, task.license)
