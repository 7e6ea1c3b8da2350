"""`deltatune subspace ...`: the unified optimization subspace of delta methods, stage by stage.

Every stage reads the study's settings from `<workdir>/study.json` (written by `collect`) and skips
what the store already holds, so any command can be re-run after an interruption to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from . import checks
from .args import add_columns_argument

HELP = "unified subspace of delta methods: collect, find, optimize, transfer, landscape, intrinsic-dim, report"
STAGES = ("init", "collect", "find", "optimize", "transfer", "landscape", "intrinsic-dim", "report", "all")


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integer seeds, e.g. 42,43,44") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", required=True)
    for stage in STAGES:
        s = sub.add_parser(stage, help=_STAGE_HELP[stage], description=_STAGE_HELP[stage])
        s.add_argument("--workdir", default="runs/subspace", help="the study's folder (default runs/subspace)")
        s.add_argument("--db", default=None, help="SQLite file for the results (default <workdir>/subspace.db)")
        s.add_argument(
            "--tasks", type=_list, default=None,
            help="comma list of collection names or your own folders/files (init and collect add them to the "
            "study); restricts this stage to these tasks",
        )  # fmt: skip
        if stage in ("init", "collect", "all"):
            _study_arguments(s)
        if stage == "find":
            s.add_argument(
                "--which", type=_list, default=None,
                help="single,multi,heldout (default all; heldout only in studies with several --solution-seeds)",
            )  # fmt: skip
            s.add_argument(
                "--init", choices=("joint", "random"), default="joint",
                help="joint: warm start from the joint decomposition (unified-* spaces); random: projections "
                "trained from scratch, as in the paper (scratch-* spaces, --scratch-find-steps per task)",
            )  # fmt: skip
        if stage == "optimize":
            s.add_argument(
                "--spaces", type=_list, default=None,
                help="single,multi,heldout,scratch-single,scratch-multi,scratch-heldout,pca,random (default all found)",
            )  # fmt: skip
        if stage == "landscape":
            s.add_argument(
                "--method",
                default=None,
                help="the method whose basis scores the plane (default lora, or the study's first)",
            )
            s.add_argument("--grid", type=int, default=5, help="grid points per axis")
        if stage == "intrinsic-dim":
            s.add_argument("--said-steps", type=int, default=None, help="steps per SAID run (default the study's)")
            s.add_argument("--d-max", type=int, default=None, help="where the search stops (default the study's)")
        if stage in ("report", "all"):
            s.add_argument("--out", default=None, help="report folder (default <workdir>/report)")


_STAGE_HELP = {
    "init": "write the study's settings (<workdir>/study.json) without training; --tasks names the study's tasks",
    "collect": "train (or skip if stored) each task's head and each method's solution; writes study.json",
    "find": "learn the unified subspace per task and across the seen tasks; PCA and random baselines",
    "optimize": "train only the d-dim vector through each method's subspace basis",
    "transfer": "use each optimized vector through the other methods' bases",
    "landscape": "metric/loss over a plane of a task's subspace and along paths between methods (PNG)",
    "intrinsic-dim": "d90 of each task by SAID runs (doubling, then bisection in d)",
    "report": "the paper-form tables (Markdown + HTML with the figures)",
    "all": "every stage in order (resumable)",
}


_COUNTS = (("k_shot", int), ("dev_k", int), ("n_eval", int), ("seed", int), ("max_length", int), ("batch_size", int),
           ("steps", int), ("eval_every", int), ("head_lr", float), ("d", int), ("hidden", int),
           ("alpha", float), ("find_steps", int), ("scratch_find_steps", int), ("optimize_steps", int),
           ("optimize_lr", float), ("d_max", int), ("said_steps", int))  # fmt: skip


def _study_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default=None, help="a classification backbone (default minilm-l6)")
    s.add_argument("--unseen", type=_list, default=None, help="tasks held out of the multi-task subspace")
    s.add_argument("--methods", type=_list, default=None, help="default adapter,lora,prefix,selective")
    s.add_argument("--method-arg", action="append", default=[], help="method.key=value, e.g. lora.r=8")
    s.add_argument("--lr", action="append", default=[], help="method=rate, e.g. lora=5e-3")
    s.add_argument(
        "--solution-seeds", type=_seeds, default=None,
        help="seeds of the solutions per task and method, the --seed among them, e.g. 42,43,44 (default the --seed "
        "alone); with several, `find` adds held-out subspaces (heldout-<task>) found without the --seed's solution",
    )  # fmt: skip
    for name, kind in _COUNTS:
        s.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    add_columns_argument(s, "those names, or common ones; the same for every task")
    s.add_argument(
        "--dev-split", type=float, default=None,
        help="for tasks without a dev split (which every score is measured on): hold out this fraction of train, "
        "seeded and stratified, e.g. 0.2",
    )  # fmt: skip


def _study_config(args: argparse.Namespace):  # noqa: ANN202
    from ..subspace.config import StudyConfig
    from .args import parse_value

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(StudyConfig)
        if getattr(args, f.name, None) is not None
    }
    given.pop("tasks", None)
    if args.tasks:
        given["tasks"] = args.tasks
    for pair in args.method_arg:
        key, sep, value = pair.partition("=")
        method, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--method-arg {pair!r} is not method.key=value, e.g. --method-arg lora.r=8")
        given.setdefault("method_args", {}).setdefault(method, {})[field] = parse_value(value)
    for pair in args.lr:
        method, sep, value = pair.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if not sep or not method or rate is None:
            raise ValueError(f"--lr {pair!r} is not method=rate, e.g. --lr lora=5e-3 (one --lr for each method)")
        given.setdefault("lrs", {})[method] = rate
    return StudyConfig.start_or_resume(args.workdir, given)  # the resume rule lives in the library


def _check_paths_and_counts(args: argparse.Namespace) -> None:
    """What the flags name, checked before any stage starts (a bad --db after an hour of collect is too late)."""
    workdir = checks.out_folder(args.workdir, "--workdir")
    if args.db:
        from ..subspace.store import SCHEMA

        # a stage that reads results needs a file that holds them: a misspelt --db was created empty and the
        # report written from it over the real one (exit 0), and a study store got subspace tables added
        reads = args.stage not in ("init", "collect", "all")
        checks.sqlite_file(args.db, "--db", must_exist=reads, tables=tuple(SCHEMA) if reads else ())
    elif workdir is not None and workdir.is_dir():
        checks.sqlite_file(workdir / "subspace.db", "--workdir's subspace.db")
    checks.out_folder(getattr(args, "out", None), "--out")
    kinds = ("single", "multi", "heldout")
    unknown = [w for w in getattr(args, "which", None) or () if w not in kinds]
    if unknown:
        raise ValueError(f"--which {','.join(unknown)}: not a kind of subspace; choose from {','.join(kinds)}")
    spaces = ("single", "multi", "heldout", "scratch-single", "scratch-multi", "scratch-heldout", "pca", "random")
    unknown = [w for w in getattr(args, "spaces", None) or () if w not in spaces]
    if unknown:  # was: nothing optimized, exit 0
        raise ValueError(f"--spaces {','.join(unknown)}: not a kind of subspace; choose from {','.join(spaces)}")
    checks.at_least(getattr(args, "grid", None), 2, "--grid")
    for flag in ("said_steps", "d_max"):
        checks.at_least(getattr(args, flag, None), 1, "--" + flag.replace("_", "-"))
    for name, kind in _COUNTS:
        if kind is int and name not in ("seed",):
            checks.at_least(getattr(args, name, None), 1, "--" + name.replace("_", "-"))
        value = getattr(args, name, None)
        if kind is float and value is not None:
            floor = ">= 0" if name == "alpha" else "> 0"  # alpha weighs a loss term (0 turns it off); rates are > 0
            if not math.isfinite(value) or (value < 0 if name == "alpha" else value <= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {floor}, got {value}")


def run(args: argparse.Namespace) -> int:
    from ..subspace.pipeline import Study, landscape
    from ..subspace.report import build

    _check_paths_and_counts(args)
    starting = args.stage in ("init", "collect", "all")
    if starting:
        _study_config(args)
    study = Study(args.workdir, args.db)
    tasks = args.tasks
    if tasks:  # names or the paths they were given as; init, collect and all add tasks the study lacks
        tasks = study.add_tasks(tasks) if starting else study.cfg.task_names(tasks)
    if args.stage == "init":
        cfg = study.cfg
        named = [f"{t} ({cfg.sources[t]})" if t in cfg.sources else t for t in cfg.tasks]
        print(
            f"study in {args.workdir}: {len(cfg.tasks)} tasks ({', '.join(named)}), methods {', '.join(cfg.methods)}, "
            f"d={cfg.d}, solution seeds {','.join(map(str, cfg.seeds))}"
        )
        return 0
    stages = STAGES[1:-1] if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "collect":
            study.collect(tasks)
        elif stage == "find":
            which, init = getattr(args, "which", None), getattr(args, "init", "joint")
            if which is None:  # every kind; held-out spaces when the study has seeds to hold one out from
                study.find(tasks, init=init)
            else:
                study.find(tasks, "single" in which, "multi" in which, init, heldout="heldout" in which)
        elif stage == "optimize":
            study.optimize(tasks, getattr(args, "spaces", None))
        elif stage == "transfer":
            study.transfer(tasks)
        elif stage == "landscape":
            methods = study.cfg.methods
            method = getattr(args, "method", None) or ("lora" if "lora" in methods else methods[0])
            for task in tasks or study.cfg.tasks[:1]:
                landscape(study, task, method, n=getattr(args, "grid", 5))
        elif stage == "intrinsic-dim":
            study.intrinsic(tasks, getattr(args, "said_steps", None), getattr(args, "d_max", None))
        elif stage == "report":
            out = Path(args.out or study.workdir / "report")
            figures = sorted((study.workdir / "landscape").glob("*.png"))
            md, page = build(study.store, study.cfg.methods, out, figures)
            print(md.read_text())
            print(f"wrote {md} and {page}")
    return 0
