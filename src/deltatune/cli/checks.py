"""Checks of what a command line names (files, folders, counts), run before any work starts.

Each raises ValueError with one line naming the flag and the fix; `deltatune.cli.main` prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_file(path: str | Path, flag: str, *, must_exist: bool = False) -> Path:
    """A study/result database: absent (it will be created) or an SQLite file, never a text file or a folder."""
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
