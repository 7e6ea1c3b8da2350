"""One SQLite file holds a whole study: the spec, every run with its status, results and curves.

Resuming rests on three rules. A run is claimed inside a write transaction, so two runners never
take the same run. A run's results (row and curve) are written in one transaction and only by the
runner that holds the claim, so a run is recorded once or not at all. A run left 'running' by a
process that no longer exists is put back to 'pending' when a runner starts, so nothing is lost.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .lr_grid import choose, rate_field

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL, task TEXT NOT NULL, method TEXT NOT NULL, seed INTEGER NOT NULL,
    source_task TEXT, depends_on TEXT,
    job TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT, claimed_at REAL, finished_at REAL, error TEXT,
    metric TEXT, dev_score REAL, test_score REAL, best TEXT, test TEXT, best_step INTEGER, steps INTEGER,
    trainable INTEGER, total INTEGER, train_seconds REAL, wall_seconds REAL, step_seconds REAL,
    peak_memory INTEGER, memory_kind TEXT, device TEXT, delta_path TEXT, checkpoint_bytes INTEGER, diverged TEXT,
    stop_reason TEXT, majority REAL, lr REAL
);
CREATE TABLE IF NOT EXISTS curves (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL, epoch REAL, train_loss REAL, elapsed REAL, score REAL, metrics TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
);
"""
RESULT_FIELDS = (
    "metric dev_score test_score best test best_step steps trainable total train_seconds wall_seconds "
    "step_seconds peak_memory memory_kind device delta_path checkpoint_bytes diverged stop_reason majority lr"
).split()
ADDED_COLUMNS = {"stop_reason": "TEXT", "majority": "REAL", "lr": "REAL"}  # columns newer than the first stores


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid it names a process even after pid reuse."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_id(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_proc_start(pid) or '-'}"


def owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it ran elsewhere (we cannot tell)."""
    host, pid, start = (owner.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return start == "-" or _proc_start(int(pid)) == start


def _identity(path: Path) -> tuple[int, int] | None:
    """The file behind `path` (device, inode): a store replaced on disk is another file, which SQLite's open
    connection does not follow."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class Store:
    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        """Open (or create) a study file; `readonly` opens an existing one without creating or upgrading
        it, so that writing a report leaves a committed store byte-for-byte unchanged."""
        self.path = Path(path)
        if readonly:
            self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.identity = _identity(self.path)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.conn.executescript(SCHEMA)
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
        for name, kind in ADDED_COLUMNS.items():  # a store written before these columns existed
            if name not in have:
                self.conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front: a claim cannot interleave with another."""
        if _identity(self.path) != self.identity:
            raise RuntimeError(
                f"{self.path} was replaced while this study ran (a git checkout, stash or pull of the store?): this "
                "process wrote to the file it opened, which is gone, and the runs it finished since are not in the new "
                "one (before, SQLite said 'attempt to write a readonly database'). Keep the store out of such commands "
                "while a study runs; run the study again to go on (finished runs are kept, add --reclaim for the ones "
                "the replaced file shows running)"
            )
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ the plan

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def add_jobs(self, jobs: list[dict[str, Any]]) -> int:
        """Insert the runs not yet planned; a planned run whose settings changed is an error, not a rerun."""
        added = 0
        with self.transaction() as c:
            for job in jobs:
                row = c.execute("SELECT job FROM runs WHERE key = ?", (job["key"],)).fetchone()
                if row is not None:
                    changes = settings_changes(json.loads(row[0]), job)
                    if changes:
                        raise ValueError(
                            f"study column {job['label']} (run {job['key']}) is already in {self.path.name} with other "
                            f"settings: {'; '.join(changes[:4])}; use a new --db for the changed study, or restore "
                            "the spec's settings"
                        )
                    continue
                c.execute(
                    "INSERT INTO runs (key, model, task, method, seed, source_task, depends_on, job) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job["key"],
                        Path(job["model"]).name,
                        Path(job["task"]).name,
                        job["label"],
                        job["seed"],
                        job["source_task"] and Path(job["source_task"]).name,
                        job["depends_on"],
                        json.dumps(job, sort_keys=True),
                    ),
                )
                added += 1
        return added

    # ------------------------------------------------------------------ claiming and recording

    def recover(self, other_hosts: bool = False) -> list[str]:
        """Put back to 'pending' the runs whose claiming process died (kill -9, power loss, OOM).

        A run claimed on another host is left alone (its process cannot be checked from here) unless
        `other_hosts`: a store committed mid-run and resumed on a machine with another name.
        """
        back = []
        with self.transaction() as c:
            for row in c.execute("SELECT id, key, owner FROM runs WHERE status = 'running'").fetchall():
                alive = owner_alive(row["owner"] or "")
                if alive is False or (alive is None and other_hosts):
                    c.execute("UPDATE runs SET status = 'pending', owner = NULL WHERE id = ?", (row["id"],))
                    back.append(row["key"])
        return back

    def retry_failed(self) -> int:
        with self.transaction() as c:
            return c.execute("UPDATE runs SET status = 'pending', error = NULL WHERE status = 'failed'").rowcount

    def claim(self, owner: str) -> dict[str, Any] | None:
        """Take the next runnable run; None when nothing is runnable now.

        Runnable: its source run (transfer) is done, and the learning-rate grid it takes its rate
        from (`lr_from`) has nothing pending, running or failed (a choice without the failed rate was frozen, and
        the report then bolded a worse rate as "the best" once the failed run was retried). Such a run comes back with the chosen rate
        in its train settings (`lr`, or `head_lr` for the head-only column) and in `lr_choice`.
        """
        with self.transaction() as c:
            row = c.execute(
                "SELECT r.id, r.job, d.delta_path AS source_path FROM runs r LEFT JOIN runs d ON d.key = r.depends_on "
                "WHERE r.status = 'pending' AND (r.depends_on IS NULL OR d.status = 'done') AND NOT EXISTS ("
                "  SELECT 1 FROM runs g WHERE json_extract(r.job, '$.lr_from') IS NOT NULL"
                "  AND json_extract(g.job, '$.lr_group') = json_extract(r.job, '$.lr_from')"
                "  AND g.status IN ('pending', 'running', 'failed')"  # a failed rate is unmeasured: no choice yet
                ") ORDER BY r.id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE runs SET status = 'running', owner = ?, claimed_at = ?, attempts = attempts + 1 WHERE id = ?",
                (owner, time.time(), row["id"]),
            )
        job = json.loads(row["job"])
        job["id"] = row["id"]
        if row["source_path"]:
            job["init_from"] = row["source_path"]
        if job.get("lr_from"):
            choice = self.lr_choice(job["lr_from"])
            if choice is None:
                self.fail(job["id"], owner, f"every run of the learning-rate grid {job['lr_from']} failed")
                return self.claim(owner)
            job["train"] = {**job["train"], rate_field(job["label"]): choice["lr"]}
            job["lr_choice"] = choice
        return job

    def lr_choice(self, group: str) -> dict[str, Any] | None:
        """The grid's rate with the best mean dev score over its tasks (`lr_grid.choose`), filed in meta
        `lr_choice` the first time: runs planned later (more seeds) use the rate the first runs used
        even if the grid is extended. None when no rate finished on every task it ran on."""
        chosen = self.meta("lr_choice", {})
        if group in chosen:
            return chosen[group]
        rows = self.conn.execute(
            "SELECT key, job, status, dev_score FROM runs WHERE json_extract(job, '$.lr_group') = ?", (group,)
        ).fetchall()
        planned, runs = set(self.meta("planned") or ()), []
        for r in rows:
            if planned and r["key"] not in planned:  # a rate the spec no longer lists
                continue
            job = json.loads(r["job"])
            runs.append((job["train"].get(rate_field(job["label"])), r["status"], r["dev_score"]))
        choice = choose(runs)
        if choice is None:
            return None
        with self.transaction() as c:  # re-read inside the write lock: a second runner may have filed it
            row = c.execute("SELECT value FROM meta WHERE key = 'lr_choice'").fetchone()
            current = json.loads(row[0]) if row else {}
            if group in current:
                return current[group]
            current[group] = choice
            c.execute("INSERT OR REPLACE INTO meta VALUES ('lr_choice', ?)", (json.dumps(current),))
        return choice

    def copy_result(self, run_id: int, owner: str, source_key: str, lr: float | None = None) -> bool:
        """Record a finished run's results and curve as this run's (the same run, planned twice).

        The grid run of the chosen rate on a grid task is the main run of that task and seed: it is
        not trained again. False when the source is not done or the claim was lost.
        """
        src = self.conn.execute("SELECT * FROM runs WHERE key = ? AND status = 'done'", (source_key,)).fetchone()
        if src is None:
            return False
        result = {k: src[k] for k in RESULT_FIELDS}
        for k in ("best", "test"):
            result[k] = json.loads(result[k]) if result[k] else None
        curve = self.conn.execute("SELECT metrics FROM curves WHERE run_id = ? ORDER BY step", (src["id"],))
        result["history"] = [json.loads(r[0]) for r in curve]
        return self.finish(run_id, owner, {**result, "lr": lr if lr is not None else src["lr"]})

    def finish(self, run_id: int, owner: str, result: dict[str, Any]) -> bool:
        """Record a run's results and curve in one transaction; False if the claim was lost meanwhile."""
        with self.transaction() as c:
            values = [_column(result.get(k)) for k in RESULT_FIELDS]
            sets = ", ".join(f"{k} = ?" for k in RESULT_FIELDS)
            cur = c.execute(
                f"UPDATE runs SET {sets}, status = 'done', finished_at = ?, error = NULL "
                "WHERE id = ? AND status = 'running' AND owner = ?",
                (*values, time.time(), run_id, owner),
            )
            if cur.rowcount != 1:
                return False
            c.execute("DELETE FROM curves WHERE run_id = ?", (run_id,))
            metric = result.get("metric")
            c.executemany(
                "INSERT INTO curves VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id,
                        h["step"],
                        h.get("epoch"),
                        h.get("train_loss"),
                        h.get("elapsed"),
                        h.get(metric),
                        json.dumps(h),
                    )
                    for h in result.get("history", [])
                ],
            )
        return True

    def fail(self, run_id: int, owner: str, error: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished_at = ? WHERE id = ? AND owner = ?",
                (error, time.time(), run_id, owner),
            )

    def release(self, run_id: int, owner: str) -> None:
        """Give a claimed run back (interrupted with Ctrl-C): it will run again next time."""
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status = 'pending', owner = NULL WHERE id = ? AND owner = ? AND status = 'running'",
                (run_id, owner),
            )

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        return {s: 0 for s in ("pending", "running", "done", "failed")} | {r[0]: r[1] for r in rows}

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY id"
        rows = [dict(r) for r in self.conn.execute(query, (status,) if status else ())]
        for r in rows:
            for k in ("best", "test", "job"):
                r[k] = json.loads(r[k]) if r.get(k) else None
        return rows

    def curves(self) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for r in self.conn.execute("SELECT run_id, metrics FROM curves ORDER BY run_id, step"):
            out.setdefault(r[0], []).append(json.loads(r[1]))
        return out

    def blocked(self) -> list[str]:
        """Pending runs that cannot start because a run they depend on failed (a transfer's source, a grid rate)."""
        rows = self.conn.execute(
            "SELECT r.key FROM runs r WHERE r.status = 'pending' AND (EXISTS (SELECT 1 FROM runs d WHERE "
            "d.key = r.depends_on AND d.status = 'failed') OR EXISTS (SELECT 1 FROM runs g WHERE g.status = 'failed' "
            "AND json_extract(g.job, '$.lr_group') = json_extract(r.job, '$.lr_from')))"
        )
        return [r[0] for r in rows]


IGNORED = {"threads", "output_dir"}  # how a run is executed and where it is filed, not what it computes


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a run as recorded and as the spec plans it now, as `methods.lora.r 4 -> 8`.

    A model or task compares by folder name (the run's key names it): a store and its data moved to
    another folder still resume. A setting the old record lacks and the spec leaves empty is no change
    (stores written before the setting existed).
    """
    was, now = {}, {}
    for key in (set(old) | set(new)) - IGNORED:
        was |= _flat(old.get(key), key)
        now |= _flat(new.get(key), key)
    for key in ("model", "task", "source_task"):
        for d in (was, now):
            d[key] = d.get(key) and Path(d[key]).name
    return [
        f"{k} {was.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(was) | set(now))
        if was.get(k) != now.get(k) and (k in was or not _empty(k, now.get(k)))
    ]


def _empty(key: str, value: Any) -> bool:
    """A value the spec may add to a run the store recorded without it, as no change: an empty one. A training or
    method setting is written only when the spec names it, so there only None is empty: `warmup_ratio: 0` added
    to an edited spec changed the runs still to come (the default is 0.06) and was read as no change."""
    if key.startswith(("train.", "methods.")):
        return value is None
    return value in (None, False, 0, "", [], {})


def _column(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
