"""What a study's runs were computed from besides their settings: the files of each model and task.

A store compares a run's settings, and its model and task by folder name (a store moved with its data to another
folder still resumes). The files themselves were never compared: a task's test.jsonl edited in place, another
folder of the same name with other rows, or a model folder of the same name with other weights resumed without a
word, and the report averaged runs on the old files with runs on the new ones into one cell (tiny BERT on an SST-2
cut: 59.4 on both seeds before the edit, "50.0 +- 13.3" after). Each input's files are hashed (sha256, again only
when a file's size or modification time changed) and recorded in the store; files that changed after runs of that
input were done are refused, naming the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .store import Store

META = "inputs"  # the store's meta key: {"task:sst2": {file name: [size, mtime_ns, sha256]}, "model:...": ...}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def task_files(task: str) -> list[Path]:
    """The files a task is read from: its folder's splits and meta.json, or a single file (with a meta.json beside)."""
    from ..data.collection import resolve_name
    from ..data.files import FILE_SUFFIXES

    path = Path(task).expanduser()
    if not path.exists():
        path = resolve_name(task)
    if path.is_file():
        meta = path.parent / "meta.json"
        return [path, *([meta] if meta.is_file() else [])]
    return sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in FILE_SUFFIXES or p.name == "meta.json"))


def model_files(model: str) -> list[Path]:
    """The files of a model folder (weights, config, tokenizer); none for a name that is not a local folder."""
    from ..backbones import model_path

    folder = Path(model_path(model)).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")


def _record(files: list[Path], before: dict[str, list[Any]]) -> dict[str, list[Any]]:
    entry = {}
    for f in files:
        st = f.stat()
        old = before.get(f.name)
        same = old is not None and old[:2] == [st.st_size, st.st_mtime_ns]
        entry[f.name] = old if same else [st.st_size, st.st_mtime_ns, _sha256(f)]
    return entry


def _done(store: Store, kind: str, name: str) -> bool:
    where = "model = ?" if kind == "model" else "(task = ? OR source_task = ?)"
    args = (name,) if kind == "model" else (name, name)
    return (
        store.conn.execute(f"SELECT 1 FROM runs WHERE status = 'done' AND {where} LIMIT 1", args).fetchone() is not None
    )


def check_inputs(store: Store, jobs: list[dict[str, Any]]) -> None:
    """Refuse a model or task whose files differ from those its finished runs used; record them otherwise."""
    recorded: dict[str, dict[str, list[Any]]] = store.meta(META, {})
    sources = {("model", j["model"]) for j in jobs} | {("task", j["task"]) for j in jobs}
    sources |= {("task", j["source_task"]) for j in jobs if j.get("source_task")}
    now = dict(recorded)
    for kind, source in sorted(sources):
        name = Path(source).name  # as the runs table and the run keys name it
        before = recorded.get(f"{kind}:{name}", {})
        entry = _record(model_files(source) if kind == "model" else task_files(source), before)
        changed = sorted(
            n for n in set(before) | set(entry) if (before.get(n) or [None] * 3)[2:] != (entry.get(n) or [None] * 3)[2:]
        )
        if before and changed and _done(store, kind, name):
            what = "is new" if changed[0] not in before else "is gone" if changed[0] not in entry else "changed"
            raise ValueError(
                f"{kind} {name!r}: {changed[0]} {what} since this store's finished runs of it (its runs would mix "
                f"two versions of the {kind} in one cell); use a new --db for the new files, or restore them"
            )
        now[f"{kind}:{name}"] = entry
    if now != recorded:
        store.set_meta(META, now)
