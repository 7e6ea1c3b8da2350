"""Checks of what a command line names (files, folders, counts), run before any work starts.

Each raises ValueError with one line naming the flag and the fix; `deltatune.cli.main` prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SQLITE_HEADER = b"SQLite format 3\x00"
# deltatune's stores by a table each holds (study.store, subspace.store), and the command that reads each
_KINDS = {
    "a `deltatune study` store": ("runs", "deltatune study status {}"),
    "a `deltatune subspace` store": ("subspace_results", "deltatune subspace report --db {}"),
}


def sqlite_file(path: str | Path, flag: str, *, must_exist: bool = False, tables: tuple[str, ...] = ()) -> Path:
    """A study/result database: absent (it will be created) or an SQLite file, never a text file or a folder.

    With `tables`, an SQLite file that holds tables but none of these is someone else's database:
    refused before deltatune adds its own tables to it.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder; pass a .sqlite file path (it is created if missing)")
    if not p.exists():
        if must_exist:
            raise FileNotFoundError(f"{flag}: no such file {p}; pass the .sqlite file a run wrote")
        return p
    with open(p, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        raise ValueError(
            f"{flag} {p} is not an SQLite database (it holds other data); pass the .sqlite file deltatune wrote, "
            "or a new path"
        )
    if head and tables:
        import sqlite3

        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
        if present and not present & set(tables):
            for kind, (marker, read) in _KINDS.items():
                if marker in present:  # deltatune's own store of another kind: say which, and what reads it
                    raise ValueError(
                        f"{flag} {p} is {kind}, which this command does not read; read it with `{read.format(p)}`, "
                        "or pass the file this command wrote"
                    )
            raise ValueError(
                f"{flag} {p} is an SQLite database of something else (tables {', '.join(sorted(present)[:4])}); "
                "pass the file deltatune wrote, or a new path"
            )
    return p


def out_folder(path: str | Path | None, flag: str) -> Path | None:
    """An output folder: absent or a folder, never an existing file (it would be overwritten or fail midway)."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is an existing file; pass a folder (it is created if missing)")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {p}: {parent} is a file, not a folder; pass another path")
    return p


def at_least(value: Any, low: int, flag: str) -> None:
    """An integer flag with a floor (argparse has already made it an int)."""
    if value is not None and value < low:
        raise ValueError(f"{flag} must be at least {low}, got {value}")
