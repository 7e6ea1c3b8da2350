"""A user's checkpoint that is already a classifier: keep its head only where it means the task's classes.

A folder saved as `...ForSequenceClassification` carries a head whose rows are classes named by its
config's id2label. Loaded as is, row i scores the checkpoint's class i, which is the task's class i
only by luck: rows are reordered by name, a head of another class count is replaced by a new one (with
a notice), and a head whose classes have other names is refused. A decoder saved as a classifier
(Llama/GPT-2 ForSequenceClassification) trains through that head, not as a causal LM.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
from torch import nn

from ..data.tasks import Task

GENERIC_LABEL = re.compile(r"LABEL_\d+")  # transformers' default names: they say nothing about the classes


def saved_classifier(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


def label_names(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]


def plan(model_name: str, config: Any, task: Task) -> tuple[dict[str, Any], list[int] | None]:
    """Loading arguments for the checkpoint's head, and the rows to take in the task's class order (None: as saved)."""
    if not saved_classifier(config):
        return {}, None
    want = 1 if task.type == "regression" else task.num_labels
    names = label_names(config)
    if config.num_labels != want:
        print(
            f"deltatune: {model_name} is a classifier of {config.num_labels} classes {names}; task {task.name!r} "
            f"has {want}: its head is left out and a new one is drawn",
            file=sys.stderr,
        )
        return {"ignore_mismatched_sizes": True}, None
    if task.type == "regression" or all(GENERIC_LABEL.fullmatch(n) for n in names):
        return {}, None
    have = [n.lower() for n in names]
    labels = [str(x).lower() for x in task.labels]
    if have == labels:
        return {}, None
    if sorted(have) != sorted(labels):
        raise ValueError(
            f"{model_name} is a classifier of the classes {names} and task {task.name!r} has {list(task.labels)}: "
            "its head would score other classes; name the task's labels as the checkpoint does (meta.json "
            "'labels'), or start from the checkpoint's base model"
        )
    return {}, [have.index(lbl) for lbl in labels]


def align(model: nn.Module, rows: list[int] | None, task: Task) -> None:
    """Reorder the output rows of the head (the last Linear with one row per class) to the task's order;
    the config then names the task's classes (also for a new head: a replaced one left the old names)."""
    if task.type == "regression" or (rows is None and len(model.config.id2label) == task.num_labels):
        return
    if rows is not None:
        out = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == len(rows)][-1]
        index = torch.tensor(rows)
        with torch.no_grad():
            out.weight.copy_(out.weight[index])
            if out.bias is not None:
                out.bias.copy_(out.bias[index])
    model.config.id2label = dict(enumerate(task.labels))
    model.config.label2id = {lbl: i for i, lbl in enumerate(task.labels)}
