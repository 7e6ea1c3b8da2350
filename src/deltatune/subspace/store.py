"""The subspace study's results in SQLite: tables prefixed `subspace_`, so one file can hold other studies too.

Every stage writes one row per finished unit of work (a solution, a subspace, one optimization)
keyed by what it was run on; a stage that is restarted asks the store what is done and skips it,
which is what makes the long real pipeline resumable after a crash or a kill.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = {
    "subspace_solutions": (
        "task TEXT, method TEXT, seed INTEGER, size INTEGER, score REAL, metric TEXT, path TEXT, "
        "seconds REAL, meta TEXT, created REAL, PRIMARY KEY (task, method, seed)"
    ),
    "subspace_spaces": (
        "name TEXT PRIMARY KEY, kind TEXT, d INTEGER, tasks TEXT, methods TEXT, path TEXT, meta TEXT, created REAL"
    ),
    "subspace_results": (
        "space TEXT, stage TEXT, task TEXT, method TEXT, source TEXT, score REAL, original REAL, ratio REAL, "
        "meta TEXT, created REAL, PRIMARY KEY (space, stage, task, method, source)"
    ),
    "subspace_study": "key TEXT PRIMARY KEY, value TEXT, created REAL",  # binding.py: what the results were made with
    "subspace_intrinsic": (
        "task TEXT, d INTEGER, score REAL, reference REAL, ratio REAL, seconds REAL, created REAL, steps INTEGER, "
        "PRIMARY KEY (task, d, steps)"
    ),
}
JSON_COLUMNS = {"meta", "tasks", "methods", "value"}


def share(score: float, original: float | None) -> float | None:
    """`score` as a fraction of `original`, or None where that is no measure of how much was recovered.

    Only a positive original makes "% of the original" mean anything: a correlation (Pearson on a regression
    task, Matthews) of a short run can be zero or negative, and dividing by it inverts the scale (a score of
    -0.04 against an original of -0.05 read as 80%, a worse -0.10 as 200%). Those rows keep their scores;
    the report leaves them out of the averages and says how many.
    """
    if original is None or score is None or not original > 0:
        return None
    return score / original


class Store:
    """A thin, explicit wrapper: `put` a row (replacing one with the same key), `rows` to read them back."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            for table, columns in SCHEMA.items():
                db.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
            _migrate(db)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60)
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def put(self, table: str, **row: Any) -> None:
        _check_table(table)
        row.setdefault("created", time.time())
        values = [json.dumps(v) if k in JSON_COLUMNS else v for k, v in row.items()]
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as db:
            db.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", values)

    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        _check_table(table)
        clause = " AND ".join(f"{k} = ?" for k in where)
        sql = f"SELECT * FROM {table}" + (f" WHERE {clause}" if where else "") + " ORDER BY created"
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            found = [dict(r) for r in db.execute(sql, list(where.values()))]
        for r in found:
            for k in JSON_COLUMNS & set(r):
                r[k] = json.loads(r[k]) if r[k] is not None else None
        return found

    def one(self, table: str, **where: Any) -> dict[str, Any] | None:
        found = self.rows(table, **where)
        return found[-1] if found else None

    def has(self, table: str, **where: Any) -> bool:
        return bool(self.rows(table, **where))


def _migrate(db: sqlite3.Connection) -> None:
    """Stores written before SAID runs recorded their step budget: rebuild that table with `steps` (NULL = unknown)."""
    columns = [r[1] for r in db.execute("PRAGMA table_info(subspace_intrinsic)")]
    if "steps" in columns:
        return
    db.execute("ALTER TABLE subspace_intrinsic RENAME TO subspace_intrinsic_old")
    db.execute(f"CREATE TABLE subspace_intrinsic ({SCHEMA['subspace_intrinsic']})")
    old = ", ".join(columns)
    db.execute(f"INSERT INTO subspace_intrinsic ({old}) SELECT {old} FROM subspace_intrinsic_old")
    db.execute("DROP TABLE subspace_intrinsic_old")


def _check_table(table: str) -> None:
    if table not in SCHEMA:
        raise ValueError(f"unknown table {table!r}; the subspace store has {', '.join(SCHEMA)}")
