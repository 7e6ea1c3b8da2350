"""Where a subspace study's tasks come from: a collection name, or the user's own folder or file.

A study files everything under a task's *name*: heads/<name>, solutions/<name>/, spaces named
unified-<name>, store rows. A path given with `--tasks` cannot be that name: an absolute one made
`workdir / "heads" / name` point outside the work folder (the heads and solutions were written into the
user's data folder), a relative one read other data when a stage ran from another folder. So a path
is resolved once, when the study starts: the task is named after the folder or the file's stem, and
its absolute path is recorded in study.json (`sources`) for every later stage to read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.collection import resolve_name
from ..data.fewshot import few_shot_task
from ..data.files import FILE_SUFFIXES
from ..data.split import hold_out_dev
from ..data.tasks import DataError, Example, Task, load_task

if TYPE_CHECKING:
    from .config import StudyConfig

# names the study's own files and subspaces would confuse: `unified-multi` is the multi-task subspace's,
# `scratch-heldout-<t>` a held-out one's, and `task@seed` names one seed's solutions
_RESERVED = re.compile(r"multi|heldout-.*|.*@.*")


def resolve(text: str) -> tuple[str, str | None]:
    """(the task's name in the study, the absolute path of its data or None for a collection task)."""
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        name = path.stem if path.is_file() else path.name
        if path.is_file() and path.suffix not in FILE_SUFFIXES:
            raise ValueError(f"--tasks {text}: not a {'/'.join(FILE_SUFFIXES)} file or a folder of them")
        check_name(name, text)
        return name, str(path)
    if path.suffix in FILE_SUFFIXES or os.sep in text or (os.altsep and os.altsep in text):
        raise ValueError(f"--tasks {text}: no such file or folder")
    try:
        name = resolve_name(text).name  # SST-2 -> sst2: one task, one name
    except DataError as err:
        if "no task collection found" in str(err):
            return text, None  # no collection on this machine to check against; loading says so
        raise ValueError(f"--tasks {text}: {err}") from None
    check_name(name, text)
    return name, None


def check_name(name: str, given: str | None = None) -> None:
    if _RESERVED.fullmatch(name) or not name or name.startswith("."):
        source = f" (from {given})" if given and given != name else ""
        raise ValueError(
            f"a task named {name!r}{source} would be confused with the study's own subspaces (unified-multi, "
            "heldout-<task>) or solution sets (task@seed); rename its folder or file"
        )


def resolve_all(texts: list[str], tasks: list[str], sources: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Names for `texts` and the sources they add to the study's `tasks` and `sources`.

    A name the study already has resolves to itself (`--tasks reviews` after `--tasks data/reviews.csv`);
    one name for two different data (`a/reviews.csv` and `b/reviews.csv`, or a folder named like a
    collection task already in the study) is refused, since everything of a task is filed under its name.
    """
    names: list[str] = []
    added: dict[str, str] = {}
    for text in texts:
        if text in tasks and not Path(text).exists():
            names.append(text)
            continue
        name, source = resolve(text)
        known = {**sources, **added}
        if (name in tasks or name in names) and known.get(name) != source:
            where = known.get(name) or "the task collection"
            raise ValueError(
                f"--tasks {text}: the study already has a task named {name!r}, read from {where}; rename the "
                "folder or file (a study files each task's solutions under its name)"
            )
        if source is not None:
            added[name] = source
        names.append(name)
    return names, added


@dataclasses.dataclass
class TaskData:
    task: Task  # few-shot train and dev (model selection)
    eval: list[Example]  # a sample of the real dev split: what every reported score is measured on


def load(name: str, cfg: StudyConfig) -> Task:
    """The whole task `name` as the study reads it: from its recorded source, with the study's columns, and a
    dev split held out of train (seeded by the study) where it has none and the study gives --dev-split."""
    task = load_task(cfg.sources.get(name, name), columns=cfg.columns)
    if "dev" not in task.splits:
        if cfg.dev_split is None:
            raise ValueError(
                f"task {name!r} has no dev split (it has {', '.join(task.splits)}), which every score of the study "
                "is measured on; start the study with --dev-split 0.2 to hold out 20% of train (seeded, stratified)"
            )
        task = hold_out_dev(task, cfg.dev_split, seed=cfg.seed)
    return task


def task_data(name: str | Task, cfg: StudyConfig) -> TaskData:
    task = name if isinstance(name, Task) else load(name, cfg)
    if task.type not in ("classification", "pair_classification", "regression"):
        raise ValueError(f"task {task.name!r} is {task.type}; the subspace study uses classification tasks")
    try:
        fs = few_shot_task(task, cfg.k_shot, seed=cfg.seed, dev_k=cfg.dev_k)
    except DataError as err:  # the few-shot dev sample comes out of what the training sample left
        raise ValueError(
            f"task {task.name!r}: {err}; --k-shot {cfg.k_shot} (training) and --dev-k {cfg.dev_k} (model selection) "
            "per class must both fit its train split: start a study with smaller ones"
        ) from None
    dev = list(task["dev"])
    held = random.Random(0).sample(dev, min(cfg.n_eval, len(dev)))
    return TaskData(fs, held)


def fingerprint(data: TaskData) -> str:
    """A hash of what a task's solutions were trained, selected and scored on (labels with their names)."""
    parts = {
        split: [[e.text, e.text_pair, e.label] for e in examples]
        for split, examples in (("train", data.task["train"]), ("dev", data.task["dev"]), ("eval", data.eval))
    }
    parts["labels"] = list(data.task.labels)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def checked(data: TaskData, name: str, recorded: str | None) -> TaskData:
    """`data`, refused when it is not what the task's head and solutions were collected on.

    A file edited after `collect` (a row fixed, rows appended, labels renamed) changes the few-shot samples and
    the evaluation sample: every later score would be compared with solutions scored on the old sample.
    Stores written before the fingerprint existed have none to compare (`recorded` None).
    """
    if recorded is not None and fingerprint(data) != recorded:
        raise ValueError(
            f"task {name!r}'s data is not what its solutions were collected on (its few-shot or evaluation sample "
            "changed: was the file edited, or --columns/--dev-split?); restore the data, or start a new --workdir"
        )
    return data
