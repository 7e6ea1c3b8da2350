"""The task collection: where it lives, which tasks it holds, and a table of them for `deltatune tasks`."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .files import ENV_VAR, FILE_SUFFIXES, SPLITS, DataError, _count_rows, _read_meta, _split_file

# ----------------------------------------------------------------------------- where the collection lives


def candidate_roots() -> list[Path]:
    """Where the collection is looked for, in order: $DELTATUNE_DATA, beside the checkout, beside the cwd."""
    here = Path(__file__).resolve()
    out = []
    if os.environ.get(ENV_VAR):
        out.append(Path(os.environ[ENV_VAR]).expanduser())
    # parents[3] is the checkout root in a source tree; the collection sits inside it or beside it.
    for base in (here.parents[3], here.parents[3].parent, Path.cwd(), Path.cwd().parent):
        out.append(base / "shared" / "data" / "tasks")
    return list(dict.fromkeys(out))


def _as_tasks_dir(path: Path) -> Path:
    """Accept both `.../data/tasks` and `.../data` for $DELTATUNE_DATA."""
    if not (path / "INDEX.json").exists() and (path / "tasks").is_dir():
        return path / "tasks"
    return path


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The task collection folder; raises DataError listing every place looked at when there is none."""
    if root is not None:
        path = _as_tasks_dir(Path(root).expanduser())
        if not path.is_dir():
            raise DataError(f"task collection folder {path} does not exist")
        return path
    if os.environ.get(ENV_VAR):  # an explicit setting that points nowhere must not fall back silently
        path = _as_tasks_dir(Path(os.environ[ENV_VAR]).expanduser())
        if not path.is_dir():
            raise DataError(f"${ENV_VAR}={os.environ[ENV_VAR]} is not a folder")
        return path
    for path in candidate_roots():
        if path.is_dir():
            return path
    looked = ", ".join(str(p) for p in candidate_roots())
    raise DataError(f"no task collection found; looked in {looked}. Set ${ENV_VAR} to the folder holding <task>/")


def _task_names(root: Path) -> list[str]:
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and ((p / "meta.json").exists() or any((p / f"train{s}").exists() for s in FILE_SUFFIXES))
    )


def _resolve_name(name: str, root: Path | None) -> Path:
    try:
        base = data_root(root)
    except DataError as err:
        raise DataError(f"unknown task {name!r}: {err}") from None
    names = _task_names(base)
    if name in names:
        return base / name
    norm = {n.lower().replace("-", "").replace("_", ""): n for n in names}
    key = name.lower().replace("-", "").replace("_", "")
    if key in norm:  # SST-2 -> sst2
        return base / norm[key]
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(names)}"
    raise DataError(f"unknown task {name!r} in {base}{hint} (set ${ENV_VAR} or pass a folder/file path)")


def resolve_name(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of collection task `name` (SST-2 finds sst2); a DataError naming close names when none is."""
    return _resolve_name(name, Path(root) if root is not None else None)


def list_tasks(root: str | os.PathLike | None = None) -> list[dict]:
    """One row per task: name, type, num_labels, splits (sizes), license; from INDEX.json and meta.json files."""
    base = data_root(root)
    index = {}
    if (base / "INDEX.json").exists():
        for entry in json.loads((base / "INDEX.json").read_text(encoding="utf-8")):
            index[entry["name"]] = entry
    rows = []
    for name in sorted(set(index) | set(_task_names(base))):
        entry = index.get(name)
        meta = _read_meta(base / name / "meta.json") if (base / name / "meta.json").exists() else {}
        task_type = (entry or {}).get("type") or meta.get("type") or "unknown"
        if entry and "counts" in entry:
            sizes = dict(entry["counts"])
        elif "counts" in meta:
            sizes = dict(meta["counts"])
        else:
            sizes = {s: _count_rows(f) for s in SPLITS if (f := _split_file(base / name, s)) is not None}
        if task_type == "regression":
            num_labels = 1
        elif task_type == "generation":
            num_labels = 0
        else:
            num_labels = (entry or {}).get("n_labels") or len(meta.get("labels") or [])
        license_ = (entry or {}).get("license") or meta.get("license") or "unknown"
        rows.append({"name": name, "type": task_type, "num_labels": num_labels, "splits": sizes, "license": license_})
    return rows


def format_task_table(rows: Iterable[dict], license_width: int = 60) -> str:
    """Plain-text table of `list_tasks()` rows, numbers right-aligned; long licenses are cut to `license_width`."""
    header = ["task", "type", "labels", "train", "dev", "test", "license"]
    table = []
    for row in rows:
        sizes = row.get("splits", {})
        lic = str(row.get("license", ""))
        if len(lic) > license_width:
            lic = lic[: license_width - 3].rstrip() + "..."
        labels = "-" if row.get("type") in ("regression", "generation") else str(row.get("num_labels", ""))
        cells = [row["name"], row.get("type", ""), labels] + [str(sizes.get(s, "-")) for s in SPLITS] + [lic]
        table.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(header)]
    numeric = {2, 3, 4, 5}

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in table])
