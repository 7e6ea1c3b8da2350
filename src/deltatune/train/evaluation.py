"""Scoring a model on examples: what the training loop evaluates on dev and what a run reports.

These are separate from the loop because everything that scores a delta without training it (the
CLI's eval/predict, the study's test scores and verdicts, the subspace collection, the benchmarks)
needs the same rules: the same capped dev sample, the same multi-process gathering of predictions,
the same majority baseline, so that a number means the same thing wherever it was computed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.modes import evaluating
from ..data.metrics import compute_metrics
from ..data.tasks import Example, Task
from .distributed import process_share
from .objectives import GenerationObjective


def eval_sample(examples: list[Example], cap: int | None) -> list[Example]:
    """At most `cap` evaluation examples, drawn at random (seed 0: the same for every run) in file order.

    Several task files are sorted by label: their first rows are all one class, so a cap that took
    the first rows would evaluate on one class only.
    """
    if cap is None or len(examples) <= cap:
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


def majority_metrics(task: Task, dev: Sequence[Example]) -> dict[str, float] | None:
    """Dev metrics of a constant prediction of the most frequent dev label: the score a run must beat.

    None for regression and generation, where a constant predictor has no meaningful score.
    """
    if task.type not in ("classification", "pair_classification") or not dev:
        return None
    label = Counter(e.label for e in dev).most_common(1)[0][0]
    return compute_metrics(task, [label] * len(dev), list(dev))


def evaluate(
    model: nn.Module, objective: Any, examples: Sequence[Example], task: Task, batch_size: int
) -> dict[str, float]:
    """Dev/test metrics of the model as it is now (eval mode, no gradients)."""
    return compute_metrics(task, predict(model, objective, examples, batch_size), list(examples))


def predict(model: nn.Module, objective: Any, examples: Sequence[Example], batch_size: int) -> list:
    """The model's predictions (class indices, numbers or generated texts) as it is now, in order.

    Under a multi-process launch every process predicts its share (every world-th example) and the
    predictions are gathered back into file order, so every process returns one process's numbers.
    """
    rank, world = process_share()
    indices = list(range(rank, len(examples), world))
    examples = [examples[i] for i in indices]
    device = next(model.parameters()).device
    predictions: list = []
    with evaluating(model):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            if isinstance(objective, GenerationObjective):
                predictions += objective.generate(model, chunk)
            else:
                batch = {k: v.to(device) for k, v in objective.collate(chunk).items()}
                predictions += objective.predict(model, batch)
    if world > 1:
        from accelerate.utils import gather_object

        predictions = [p for _, p in sorted(gather_object(list(zip(indices, predictions, strict=True))))]
    return predictions
