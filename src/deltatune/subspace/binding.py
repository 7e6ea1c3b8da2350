"""One store, one study: the settings a store's results were made with, recorded in it and checked by every stage.

Every stage skips what the store holds, keyed by task, method and subspace name, not by settings. So a
store reached with other settings resumes *into* results it should not: a `--db` shared by two studies
(study B's collect skipped every task study A had, and B's report showed A's solutions), a study.json edited
after collect (a new `d` found subspaces beside solutions and vectors of the old one), a copy of a work
folder with another model. The settings are written into the store when it gets its first study and
compared on every later open and at the start of every stage (a Python user may change `study.cfg`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .store import Store

# settings that may differ from the store's: tasks grow (checked where they are added), sources go with them,
# `said_steps`/`d_max` are defaults of `intrinsic-dim`, whose runs are stored with their own budget
FREE = {"tasks", "sources", "said_steps", "d_max"}


def settings(cfg: StudyConfig) -> dict[str, Any]:
    """The settings results depend on, as JSON would give them back (lists, not tuples)."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE}
    return json.loads(json.dumps(data))


def bind(cfg: StudyConfig, store: Store, workdir: str | os.PathLike) -> None:
    """Record `cfg`'s settings in a store that has none; refuse a store whose results were made with others."""
    here = str(Path(workdir).resolve())
    row = store.one("subspace_study", key="settings")
    if row is None:
        store.put("subspace_study", key="settings", value={"workdir": here, "settings": settings(cfg)})
        return
    recorded, now = row["value"]["settings"], settings(cfg)
    differ = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
    if not differ:
        return
    first = differ[0]
    shown = f"{first}: {json.dumps(recorded.get(first))} there, {json.dumps(now.get(first))} here"
    other = row["value"]["workdir"]
    if other != here:
        fix = f"it holds the results of the study in {other}; give this study its own --db"
    else:
        fix = "was study.json edited (or study.cfg changed)? put the settings back, or start a new --workdir"
    raise ValueError(f"{store.path} holds results made with other settings ({', '.join(differ)}; {shown}): {fix}")
