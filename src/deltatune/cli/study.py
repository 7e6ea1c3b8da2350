"""`deltatune study run|status|report|presets`: the Delta Tuning empirical study, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import checks

HELP = "run a delta tuning study from a spec or preset, resumably, and report it (run, status, report, presets)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study_command", required=True)
    r = sub.add_parser("run", help="run (or resume) a study", description="Run every pending run; safe to restart.")
    r.add_argument("spec", help="a .yaml/.toml spec or a preset name (see `deltatune study presets`)")
    r.add_argument("--db", default=None, help="the study's SQLite file (default results/<name>.sqlite)")
    r.add_argument("--executor", default="sequential", choices=("sequential", "process", "ray"))
    r.add_argument("--workers", type=int, default=None, help="processes or Ray tasks at once (process/ray; default 2)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--retry-failed", action="store_true", help="run the failed runs again")
    r.add_argument("--reclaim", action="store_true", help="rerun runs another host left running (a copied store)")
    r.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (resume later)")
    r.add_argument("--report", action="store_true", help="write the report when the runs are done")
    r.add_argument("--quiet", action="store_true")
    s = sub.add_parser("status", help="what a study file holds: runs by status, failures")
    s.add_argument("db", help="the study's SQLite file")
    rep = sub.add_parser("report", help="HTML + Markdown report (tables, plots) from a study file")
    rep.add_argument("db", help="the study's SQLite file, or a folder of them")
    rep.add_argument("--out", default=None, help="output folder (default: <db without .sqlite>-report/)")
    rep.add_argument("--with", dest="also", action="append", default=[], help="join another study file (scaling)")
    sub.add_parser("presets", help="the study presets shipped with deltatune")


_TABLES = ("runs", "meta")  # what a study file holds (study.store)


def _db_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.sqlite"))
        if not files:
            raise FileNotFoundError(f"no *.sqlite study files in {p}")
        return [checks.sqlite_file(f, "db", tables=_TABLES) for f in files]
    if not p.exists():
        raise FileNotFoundError(f"no study file {p}; run `deltatune study run <spec> --db {p}` first")
    return [checks.sqlite_file(p, "db", tables=_TABLES)]


def _load_spec(source: str):  # noqa: ANN202 - a StudySpec
    """The spec, with a file that does not parse reported as one line naming the file and where."""
    from ..study import load_spec

    try:
        return load_spec(source)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"study spec {source} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from err
    except Exception as err:
        mark = getattr(err, "problem_mark", None)  # a YAML error: where it is
        if mark is None and type(err).__module__.split(".")[0] not in ("yaml", "tomllib", "tomli", "json"):
            raise
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"study spec {source} does not parse{where}: {problem}; fix the file's syntax") from err


def run(args: argparse.Namespace) -> int:
    return {"run": _run, "status": _status, "report": _report, "presets": _presets}[args.study_command](args)


def _run(args: argparse.Namespace) -> int:
    from ..study import run_study

    checks.at_least(args.workers, 1, "--workers")
    checks.at_least(args.max_runs, 1, "--max-runs")
    from ..study.executors import check_executor

    if args.workers is None:
        args.workers = 1 if args.executor == "sequential" else 2
    check_executor(args.executor, args.workers, args.address)  # before the spec's data is read
    from ..subspace.store import SCHEMA

    shared = _TABLES + tuple(SCHEMA)  # a subspace study's store may hold a study too (docs/subspace.md)
    if args.db:
        checks.sqlite_file(args.db, "--db", tables=shared)
    spec = _load_spec(args.spec)
    db = checks.sqlite_file(args.db or f"results/{spec.name}.sqlite", "--db", tables=shared)
    counts = run_study(
        spec, db, args.executor, args.workers, args.address, args.retry_failed, args.max_runs, not args.quiet,
        args.reclaim,
    )  # fmt: skip
    print(f"{db}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"]:
        from ..study.store import Store

        store = Store(db, readonly=True)
        first = next(iter(store.runs("failed")), None)
        store.close()
        why = f"; first: {first['key']}: {(first['error'] or '').strip().splitlines()[-1][:300]}" if first else ""
        print(
            f"deltatune study: {counts['failed']} run(s) failed{why} (all: deltatune study status {db})",
            file=sys.stderr,
        )
    if args.report:
        from ..study.report import write_report

        print(f"report: {write_report(db)}")
    return 1 if counts["failed"] else 0


def _status(args: argparse.Namespace) -> int:
    from ..study.store import Store

    for db in _db_files(args.db):
        store = Store(db, readonly=True)
        counts = store.counts()
        print(f"{db} ({store.meta('name', '?')}): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        for r in store.runs("running"):
            print(f"  running {r['key']} (owner {r['owner']}, attempt {r['attempts']})")
        for r in store.runs("failed"):
            print(f"  failed  {r['key']}: {(r['error'] or '').splitlines()[0]}")
        store.close()
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..study.report import write_report

    checks.out_folder(args.out, "--out")
    joined = {Path(a).resolve() for a in args.also}
    files = [f for f in _db_files(args.db) if f.resolve() not in joined]  # a folder's --with file is not its own
    for db in files:  # a folder's several reports go to --out/<stem>-report (--out was ignored for them)
        out = Path(args.out) / f"{db.stem}-report" if args.out and len(files) > 1 else args.out
        out = checks.out_folder(out or db.with_name(db.stem + "-report"), "the report folder")
        print(f"{db} -> {write_report(db, out, tuple(args.also))}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from ..study.spec import presets, read_spec_file

    for name, path in presets().items():
        raw = read_spec_file(path)
        print(f"{name:20s} {raw.get('description', '')}")
    print(f"\n(files in {Path(next(iter(presets().values()))).parent}; copy one to start your own)", file=sys.stderr)
    return 0
