"""Run a study: plan its runs into the store, then claim, execute and record them until none is left.

Killing the runner at any moment and starting it again with the same arguments finishes the study:
finished runs are skipped, the run it was in is retried, nothing is recorded twice.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .executors import _effective_lr, check_executor, make_executor
from .inputs import check_inputs
from .lr_grid import grid_key, rate_field, same_run
from .spec import StudySpec
from .store import Store, owner_alive, owner_id


def runs_dir_for(db: str | Path) -> Path:
    """Deltas and per-run files live beside the database: results/x.sqlite -> results/x.runs/."""
    return Path(db).with_suffix(".runs")


def plan(spec: StudySpec, store: Store, runs_dir: Path) -> int:
    recorded = store.meta("name")
    if recorded is not None and recorded != spec.name:  # another study's file: its runs would mix into this report
        raise ValueError(
            f"{store.path.name} holds the study {recorded!r}, not {spec.name!r}; use a new --db for this study, "
            f"or set `name: {recorded}` in the spec if it is that study"
        )
    jobs = spec.jobs()
    for job in jobs:
        job["output_dir"] = str(Path(runs_dir.name) / job["key"].replace("->", "-to-"))  # relative to the db
    check_inputs(store, jobs)  # before anything is planned: a refused study leaves the store as it was
    _check_default_rates(store, jobs)
    added = store.add_jobs(jobs)
    keys = [job["key"] for job in jobs]
    with store.transaction() as c:  # runs the spec no longer lists (a seed, a method, a rate removed) are not run
        c.execute("CREATE TEMP TABLE IF NOT EXISTS planned (key TEXT PRIMARY KEY)")
        c.execute("DELETE FROM planned")
        c.executemany("INSERT INTO planned VALUES (?)", [(k,) for k in keys])
        dropped = c.execute(
            "DELETE FROM runs WHERE status IN ('pending', 'failed') AND key NOT IN (SELECT key FROM planned)"
        ).rowcount
    if dropped:
        print(f"{dropped} planned runs are no longer in the spec: dropped (finished ones stay, out of the report)",
              file=sys.stderr)  # fmt: skip
    store.set_meta("planned", keys)  # what `claim`'s rate choice and the report count
    raw = {k: v for k, v in dataclasses.asdict(spec).items() if k != "raw"}
    store.set_meta("spec", raw)
    store.set_meta("name", spec.name)
    return added


def _check_default_rates(store: Store, jobs: list[dict[str, Any]]) -> None:
    """A column without a rate in the spec or a grid trains at its method's default; a release that changed the
    default trained the runs still to come at another rate than the cell's finished ones, and the cell averaged
    both (only its learning-rate row said 1e-3/1e-2)."""
    done: dict[tuple[str, str, str], float] = {}
    for r in store.conn.execute(
        "SELECT model, task, method, lr FROM runs WHERE status = 'done' AND lr IS NOT NULL AND source_task IS NULL "
        "AND json_extract(job, '$.lr_group') IS NULL AND json_extract(job, '$.lr_from') IS NULL"
    ):
        done[(r["model"], r["task"], r["method"])] = r["lr"]
    for job in jobs:
        was = done.get((Path(job["model"]).name, Path(job["task"]).name, job["label"]))
        if job.get("lr_from") or job.get("lr_group") or job.get("source_task") or was is None:
            continue
        if rate_field(job["label"]) in job["train"]:  # a rate the spec sets: a change is add_jobs' to name
            continue
        now = _effective_lr(job)
        if now is not None and abs(now - was) > 1e-12 * max(abs(was), 1.0):
            raise ValueError(
                f"column {job['label']} (run {job['key']}) trained its finished runs at lr {was:g} and would train "
                f"this one at {now:g} (the method's default changed since): set `lr: {was:g}` on the column to go on "
                "alike, or use a new --db"
            )


def _line(job: dict[str, Any], result: dict[str, Any]) -> str:
    score = result.get("test_score") if result.get("test_score") is not None else result.get("dev_score")
    split = "test" if result.get("test_score") is not None else "dev"
    tail = f"; diverged: {result['diverged'][:60]}" if result.get("diverged") else ""
    lr = f", lr {result['lr']:g}" if result.get("lr") else ""
    return (
        f"done {job['key']}: {split} {result['metric']} {score:.4f} (best dev {result['dev_score']:.4f} at step "
        f"{result['best_step']}/{result['steps']}, stopped by {result.get('stop_reason')}{lr}), "
        f"{result['trainable']:,} trainable, {result['wall_seconds']:.1f} s{tail}"
    )


def run_study(
    spec: StudySpec,
    db: str | Path,
    executor: str = "sequential",
    workers: int = 1,
    address: str | None = None,
    retry_failed: bool = False,
    max_runs: int | None = None,
    progress: bool = True,
    reclaim: bool = False,
) -> dict[str, int]:
    """Execute every pending run of `spec` recorded in `db`; returns the status counts at the end.

    `reclaim`: also rerun the runs another host left 'running' (a store copied or committed mid-run).
    """
    check_executor(executor, workers, address)  # before the store is planned: a refusal leaves nothing behind
    store = Store(db)
    try:
        added = plan(spec, store, runs_dir_for(db))
        back = store.recover(other_hosts=reclaim)
        if retry_failed:
            store.retry_failed()
        counts = store.counts()
        if progress:
            print(
                f"study {spec.name}: {sum(counts.values())} runs ({added} new), {counts['done']} done, "
                f"{counts['pending']} to run, {counts['failed']} failed"
                + (f", {len(back)} resumed after a crash" if back else ""),
                file=sys.stderr,
            )
        _loop(store, make_executor(executor, workers, address), counts["pending"], max_runs, progress)
        held = [r["key"] for r in store.runs("running") if owner_alive(r["owner"] or "") is None]
        if held and progress:  # "0 to run" and exit 0, and those runs never finished
            print(f"{len(held)} runs are held 'running' by a runner on another host "
                  f"({held[0]}{', ...' if len(held) > 1 else ''}): if none runs them now (a store copied or committed "
                  "mid-run), --reclaim runs them again", file=sys.stderr)  # fmt: skip
        blocked = store.blocked()
        if blocked and progress:
            print(f"{len(blocked)} runs wait on failed runs they depend on (a transfer's source run, or a rate of the "
                  "learning-rate grid); --retry-failed reruns those", file=sys.stderr)  # fmt: skip
        return store.counts()
    finally:
        store.close()


def _reuse_grid_run(store: Store, owner: str, job: dict[str, Any]) -> bool:
    """Record the grid's run at the chosen rate as this run when it is the same run (task, seed, settings)."""
    choice = job.get("lr_choice")
    if not choice:
        return False
    key = grid_key(job["key"], choice["lr"])
    row = store.conn.execute("SELECT job FROM runs WHERE key = ? AND status = 'done'", (key,)).fetchone()
    if row is None:
        return False
    if not same_run(json.loads(row[0]), job):
        return False
    return store.copy_result(job["id"], owner, key, choice["lr"])


def _loop(store: Store, pool: Any, total: int, max_runs: int | None, progress: bool) -> None:
    owner = owner_id()
    pending: dict[Any, dict[str, Any]] = {}
    started = 0
    bar = tqdm(total=min(total, max_runs or total), desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            while len(pending) < pool.workers and (max_runs is None or started < max_runs):
                job = store.claim(owner)
                if job is None:
                    break
                started += 1
                if _reuse_grid_run(store, owner, job):
                    if progress:
                        bar.write(f"done {job['key']}: the grid's run at the chosen rate {job['lr_choice']['lr']:g}")
                    bar.update(1)
                    continue
                bar.set_postfix_str(job["key"])
                here = store.path.parent
                work = {**job, "output_dir": str(here / job["output_dir"])}
                if job.get("init_from"):
                    work["init_from"] = str(here / job["init_from"])
                pending[pool.submit(work)] = job
            if not pending:
                break
            for handle, text in pool.wait(pending):
                job = pending.pop(handle)
                result = json.loads(text)
                if "error" in result:
                    store.fail(job["id"], owner, result["error"])
                    bar.write(f"FAILED {job['key']}: {result['error'].splitlines()[0]}")
                elif store.finish(job["id"], owner, {**result, "delta_path": job["output_dir"]}) and progress:
                    bar.write(_line(job, result))
                bar.update(1)
    except BaseException:
        for job in pending.values():  # Ctrl-C: hand the claimed runs back; a kill -9 is caught by recover()
            store.release(job["id"], owner)
        raise
    finally:
        bar.close()
        pool.close()
