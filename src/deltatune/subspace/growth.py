"""A study's task list grows: `collect --tasks new` (or `init`) adds tasks to study.json.

Two processes may add tasks to one study at once (the lanes `results/subspace/run.sh` runs): each read
study.json when it started, so writing back its own copy would drop the other's task. The list is
therefore re-read and extended under a lock on the work folder, and the process's settings take the
merged list.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .config import StudyConfig
from .sources import resolve_all, task_data
from .space import space_kind

if TYPE_CHECKING:
    from .pipeline import Study


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
    """An exclusive lock on `<workdir>/.study.lock` (where fcntl exists; elsewhere none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one process per study
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / ".study.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def knows(cfg: StudyConfig, text: str) -> bool:
    try:
        cfg.task_names([text])
    except ValueError:
        return False
    return True


def add_tasks(study: Study, texts: list[str]) -> list[str]:
    """The study's names for `texts`, adding the tasks it does not have yet to study.json (as seen tasks).

    Refused once a multi-task subspace (or its PCA and random baselines) was found: those were found on
    the seen tasks of that time, and a new seen task would be missing from them while every table counted
    it as seen.
    """
    if all(knows(study.cfg, t) for t in texts):
        return study.cfg.task_names(texts)
    with locked(study.workdir):
        cfg = StudyConfig.load(study.workdir)  # with what other processes added since this one started
        new = [t for t in texts if not knows(cfg, t)]
        if new:
            names, added = resolve_all(new, cfg.tasks, cfg.sources)
            multi = sorted(r["name"] for r in study.store.rows("subspace_spaces") if r["kind"] != "unified" or
                           space_kind(r["name"]) in ("multi", "scratch-multi"))  # fmt: skip
            if multi:
                raise ValueError(
                    f"{', '.join(multi)} of this study were found on its seen tasks {', '.join(cfg.seen)}; adding "
                    f"{', '.join(names)} would leave {'them' if len(names) > 1 else 'it'} out of those subspaces: "
                    "start a new --workdir with every task"
                )
            cfg.tasks = [*cfg.tasks, *(n for n in dict.fromkeys(names) if n not in cfg.tasks)]
            cfg.sources = {**cfg.sources, **added}
            cfg.validate()
            for name in added:
                task_data(name, cfg)  # own data that does not load is refused before it joins the study
            cfg.save(study.workdir)
        study.cfg.tasks, study.cfg.sources = cfg.tasks, cfg.sources
    return study.cfg.task_names(texts)
