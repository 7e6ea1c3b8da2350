"""The study's stages over a work folder and a store, each skipping what the store already holds.

`Study` loads lazily what stages share (one `Bank`, the tokenizer, the few-shot data, heads and
solutions), so a stage run alone from the command line costs no more than it needs, and every
finished unit is written to the store before the next starts: killing and restarting a stage
loses at most the unit in flight.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import atomic
from .binding import bind
from .collect import Solution, backbone_for, collect, load_head, load_solution, recorded_data
from .config import StudyConfig, TaskData, task_data
from .functional import Bank
from .sources import checked
from .space import (
    HELDOUT,
    MULTI,
    SCRATCH_HELDOUT,
    SCRATCH_MULTI,
    SCRATCH_SINGLE,
    SINGLE,
    Space,
    check_dimension,
    space_kind,
    space_path,
)
from .store import Store, share


class Study:
    def __init__(
        self,
        workdir: str | os.PathLike,
        db: str | os.PathLike | None = None,
        *,
        tokenizer: Any = None,
        make_backbone: Callable[[int], nn.Module] | None = None,
    ) -> None:
        """`tokenizer` and `make_backbone(num_labels)` default to the study's model; tests pass tiny ones."""
        self.workdir = Path(workdir)
        self.cfg = StudyConfig.load(self.workdir)
        self.store = Store(db or self.workdir / "subspace.db")
        self.bind()
        atomic.clean_stale_files(self.workdir)  # what a killed stage's file writes left; the files themselves are whole
        self._tokenizer = tokenizer
        self.make_backbone = make_backbone or (lambda n: backbone_for(self.cfg, n))

    def bind(self) -> None:
        """Refuse a store whose results were made with other settings (binding.py); every stage starts here."""
        bind(self.cfg, self.store, self.workdir)

    @functools.cached_property
    def tokenizer(self):  # noqa: ANN201
        from ..backbones import load_tokenizer

        return self._tokenizer or load_tokenizer(self.cfg.model)

    @functools.cached_property
    def bank(self) -> Bank:
        return Bank(self.make_backbone(2), self.tokenizer, self.cfg.configs(), self.cfg.max_length)

    @functools.cache  # noqa: B019 - one Study per process; the cache lives as long as it
    def data(self, task: str) -> TaskData:
        return checked(task_data(task, self.cfg), task, recorded_data(self.store, task, self.cfg.seed))

    @functools.cache  # noqa: B019
    def head(self, task: str) -> dict[str, torch.Tensor]:
        return load_head(self.workdir, task)

    def solutions(self, tasks: list[str], seeds: list[int] | None = None) -> dict[tuple[str, str], Solution]:
        """Every method's solution of `tasks` at `seeds` (default the study's), keyed by (solution set, method)."""
        found = {}
        for t in tasks:
            for s in seeds or [self.cfg.seed]:
                for m in self.cfg.methods:
                    sol = found[(self.solution_set(t, s), m)] = load_solution(self.store, t, m, s, self.workdir)
                    # a file copied in from elsewhere, of the same size: its numbers went to other tensors
                    sol.layout.check(self.bank.layouts[m], f"the {m} solution of {t!r} (seed {s})")
        return found

    def solution_set(self, task: str, seed: int) -> str:
        """A task's solutions of one seed, as a subspace names them: the study seed's by the task alone (as in
        studies with one seed), another seed's as `task@seed`; the finder treats each set like a task."""
        return task if seed == self.cfg.seed else f"{task}@{seed}"

    def _find_inputs(self, tasks: list[str], seeds: list[int]) -> tuple[dict, dict, dict]:
        """Solutions, task data and heads keyed by solution set: every seed of a task shares its data and head."""
        sets = {self.solution_set(t, s): t for t in tasks for s in seeds}
        data = {name: self.data(t) for name, t in sets.items()}
        return self.solutions(tasks, seeds), data, {name: self.head(t) for name, t in sets.items()}

    def original(self, task: str, method: str) -> float:
        row = self.store.one("subspace_solutions", task=task, method=method, seed=self.cfg.seed)
        if row is None:
            raise FileNotFoundError(f"no {method} solution for {task!r}; run `deltatune subspace collect` first")
        return row["score"]

    def space(self, name: str) -> Space:
        path = space_path(self.workdir, name)
        if not path.exists():
            raise FileNotFoundError(f"subspace {name} was not found yet ({path}); run `deltatune subspace find` first")
        space = Space.load(path)
        if space.name != name:  # another subspace's file under this name
            raise ValueError(f"{path} holds subspace {space.name!r}, not {name!r}: delete it and run find again")
        return space

    def _put_space(self, space: Space, seconds: float) -> None:
        path = space_path(self.workdir, space.name)
        space.save(path)
        meta = {k: v for k, v in space.meta.items() if k != "log"}
        self.store.put(
            "subspace_spaces", name=space.name, kind=space.kind, d=space.d, tasks=space.tasks,
            methods=space.methods, path=str(path), meta={**meta, "seconds": round(seconds, 1)},
        )  # fmt: skip

    def add_tasks(self, texts: list[str]) -> list[str]:
        """The study's names for `texts`, adding the tasks it lacks to study.json (growth.py says when it may)."""
        from .growth import add_tasks

        return add_tasks(self, texts)

    # -- stages ------------------------------------------------------------------------------------
    def collect(self, tasks: list[str] | None = None) -> None:
        """Heads and solutions of `tasks` (default all); tasks the study does not have yet are added."""
        self.bind()
        tasks = self.add_tasks(tasks) if tasks else None
        collect(self.cfg, self.store, self.workdir, tasks, self.tokenizer, self.make_backbone)

    def find(
        self,
        tasks: list[str] | None = None,
        single: bool = True,
        multi: bool = True,
        init: str = "joint",
        heldout: bool | None = None,
    ) -> None:
        """Single-task subspaces (one per task) and the multi-task one with its PCA and random baselines.

        `init="random"` trains the projections from scratch into `scratch-*` spaces, beside the warm-started
        `unified-*` ones, so both can be optimized and reported from one set of solutions.
        `heldout` (default: when the study has several solution seeds) adds `heldout-<task>` spaces found from
        the task's solutions of every seed but the study's: the in-sample `unified-<task>` holds the study
        seed's solution by construction, the held-out one never saw it, and both are compared with it. The
        multi-task subspace and its baselines use every seed's solutions of the seen tasks. Every space gets
        `find_steps` (or `scratch_find_steps`) per solution set (task and seed) it is found from.
        """
        from .baselines import pca_space, random_space
        from .find import find_unified

        self.bind()
        cfg = self.cfg
        check_dimension(cfg.d, {m: layout.size for m, layout in self.bank.layouts.items()})
        heldout = bool(cfg.other_seeds) if heldout is None else heldout
        if heldout and not cfg.other_seeds:
            raise ValueError(
                f"held-out subspaces need solutions of a second seed; start a study with --solution-seeds "
                f"{cfg.seed},{cfg.seed + 1},... (this one has only seed {cfg.seed})"
            )
        scratch = init == "random"
        one, many, out = (SCRATCH_SINGLE, SCRATCH_MULTI, SCRATCH_HELDOUT) if scratch else (SINGLE, MULTI, HELDOUT)
        per_set = cfg.scratch_find_steps if scratch else cfg.find_steps
        chosen = cfg.task_names(tasks) if tasks else cfg.tasks  # names, or the paths they were given as
        jobs = [(one.format(task=t), [t], [cfg.seed]) for t in chosen] if single else []
        jobs += [(out.format(task=t), [t], cfg.other_seeds) for t in chosen] if heldout else []
        if multi and cfg.unseen:
            jobs.append((many, cfg.seen, cfg.seeds))
        for name, on, seeds in tqdm(jobs, desc="find", dynamic_ncols=True):
            if self._found(name):
                continue
            start, log = time.perf_counter(), []
            solutions, data, heads = self._find_inputs(on, seeds)
            space = find_unified(
                self.bank, solutions, data, heads, name=name, d=cfg.d, hidden=cfg.hidden, steps=per_set * len(data),
                alpha=cfg.alpha, batch_size=cfg.batch_size, seed=cfg.seed, init=init, log=log,
            )  # fmt: skip
            space.meta.update(log=log, seeds=seeds)
            self._put_space(space, time.perf_counter() - start)
        if multi and cfg.unseen:
            sets = [self.solution_set(t, s) for t in cfg.seen for s in cfg.seeds]
            if len(sets) < cfg.d and not self._found("pca"):  # said once, when they are found
                print(f"find: the multi-task and PCA subspaces are found from {len(sets)} solutions per method, fewer "
                      f"than d={cfg.d}: {cfg.d - len(sets)} of their directions are random (more seen tasks or "
                      "--solution-seeds give them directions from solutions)", file=sys.stderr)  # fmt: skip
            for build in (pca_space, random_space):
                if not self._found(build.__name__.removesuffix("_space")):
                    start = time.perf_counter()
                    space = build(self.solutions(cfg.seen, cfg.seeds), sets, cfg.methods, cfg.d, seed=cfg.seed)
                    self._put_space(space, time.perf_counter() - start)

    def _found(self, name: str) -> bool:
        """Whether a space is done: its row and its file; a deleted file is found again unless results were
        computed in it (they would then mix with the new space's)."""
        if not self.store.has("subspace_spaces", name=name):
            return False
        path = space_path(self.workdir, name)
        if path.exists():
            return True
        if self.store.has("subspace_results", space=name):
            raise ValueError(f"{path} is missing, and results were computed in it: restore the file, or start a new "
                             "--workdir")  # fmt: skip
        return False

    def optimize_jobs(self, tasks: list[str] | None = None) -> list[tuple[str, str, str]]:
        """(space, task, method): single-task subspaces (in-sample, from scratch, held-out seed: those found) on
        their own task, multi-task ones on unseen tasks."""
        cfg, chosen = self.cfg, self.cfg.task_names(tasks) if tasks else self.cfg.tasks
        jobs = [(SINGLE.format(task=t), t, m) for t in chosen for m in cfg.methods]
        found = {r["name"] for r in self.store.rows("subspace_spaces")}
        for pattern in (SCRATCH_SINGLE, HELDOUT, SCRATCH_HELDOUT):
            jobs += [(pattern.format(task=t), t, m) for t in chosen if pattern.format(task=t) in found
                     for m in cfg.methods]  # fmt: skip
        multis = (MULTI, "pca", "random", *((SCRATCH_MULTI,) if SCRATCH_MULTI in found else ()))
        for name in multis if cfg.unseen else ():
            jobs += [(name, t, m) for t in cfg.unseen if t in chosen for m in cfg.methods]
        return jobs

    def optimize(self, tasks: list[str] | None = None, spaces: list[str] | None = None) -> None:
        from .optimize import optimize_vector

        self.bind()
        cfg = self.cfg
        jobs = [j for j in self.optimize_jobs(tasks) if spaces is None or space_kind(j[0]) in spaces]
        found = {r["name"] for r in self.store.rows("subspace_spaces")}
        missing = sorted({name for name, _, _ in jobs if name not in found})
        if missing:  # said before any optimization, not as a missing file halfway through the jobs
            raise ValueError(
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} not found yet: run `deltatune subspace "
                "find` first" + (" (or choose the kinds found with --spaces)" if found else "")
            )
        for name, task, method in tqdm(jobs, desc="optimize", dynamic_ncols=True):
            if self.store.has("subspace_results", space=name, stage="optimize", task=task, method=method):
                continue
            space = self.space(name)
            z, metrics, record = optimize_vector(
                self.bank, space, method, self.data(task), self.head(task), steps=cfg.optimize_steps,
                lr=cfg.optimize_lr, batch_size=cfg.batch_size, eval_every=cfg.eval_every, seed=cfg.seed,
            )  # fmt: skip
            score, original = metrics[self.data(task).task.primary_metric], self.original(task, method)
            self.store.put(
                "subspace_results", space=name, stage="optimize", task=task, method=method, source=method,
                score=score, original=original, ratio=share(score, original), meta=record,
            )  # fmt: skip

    def transfer(self, tasks: list[str] | None = None) -> None:
        from .optimize import transfer_scores

        self.bind()
        learned = ("single", "multi", "scratch-single", "scratch-multi", "heldout", "scratch-heldout")
        jobs = [j for j in self.optimize_jobs(tasks) if space_kind(j[0]) in learned]
        pending = [j for j in jobs if not self.store.has("subspace_results", space=j[0], stage="optimize", task=j[1],
                                                         method=j[2])]  # fmt: skip
        if jobs and len(pending) == len(jobs):  # was: a progress bar over nothing, exit 0
            raise ValueError("no vector to transfer: none was optimized yet; run `deltatune subspace optimize` first")
        if pending:
            name, task, method = pending[0]
            print(f"transfer: {len(pending)} of {len(jobs)} vectors are not optimized yet ({name}, {task}, {method}, "
                  "...); run `deltatune subspace optimize` and transfer again for them", file=sys.stderr)  # fmt: skip
        for name, task, source in tqdm(jobs, desc="transfer", dynamic_ncols=True):
            row = self.store.one("subspace_results", space=name, stage="optimize", task=task, method=source)
            if row is None or self.store.has(
                "subspace_results", space=name, stage="transfer", task=task, source=source
            ):
                continue
            z = torch.tensor(row["meta"]["z"])
            scores = transfer_scores(self.bank, self.space(name), z, source, self.data(task), self.head(task))
            for method, score in scores.items():
                original = self.original(task, method)
                self.store.put(
                    "subspace_results", space=name, stage="transfer", task=task, method=method, source=source,
                    score=score, original=original, ratio=share(score, original), meta={"z": z.tolist()},
                )  # fmt: skip

    def intrinsic(self, tasks: list[str] | None = None, steps: int | None = None, d_max: int | None = None) -> None:
        """d90 per task. `steps` and `d_max` override the study's for a longer search over the same solutions;
        runs are stored with their step budget, so searches at different budgets never mix."""
        from .intrinsic import said_capacity, said_measure, search_d90

        self.bind()
        cfg = self.cfg
        steps, d_max = steps or cfg.said_steps, d_max or cfg.d_max
        capacity = said_capacity(self.make_backbone(2), cfg.seed)
        if d_max > capacity:  # it trained every d up to the cap, then failed on SAID's own limit
            print(f"intrinsic-dim: --d-max {d_max} is above the {capacity:,} values SAID moves on this model; the "
                  f"search stops at d = {capacity:,}", file=sys.stderr)  # fmt: skip
            d_max = capacity
        for task in tqdm(cfg.task_names(tasks) if tasks else cfg.tasks, desc="intrinsic-dim", dynamic_ncols=True):
            reference = max(self.original(task, m) for m in cfg.methods)
            baseline = self.original(task, "head")
            if reference <= baseline:
                print(f"{task}: no method beat the fixed head ({baseline:.3f}); d90 is undefined, skipped")
                continue
            known = {
                r["d"]: r["score"]
                for r in self.store.rows("subspace_intrinsic", task=task)
                if r["steps"] == steps  # NULL (stored before budgets were recorded): of an unknown budget, redone
            }
            measure = said_measure(
                cfg, self.store, self.workdir, task, self.tokenizer, reference, self.make_backbone, steps
            )
            search_d90(measure, reference, baseline, d_max=d_max, known=known)


def landscape(study: Study, task: str, method: str = "lora", n: int = 5, examples: int = 64) -> dict:
    """Plane and paths in the subspace `task` was optimized in; JSON and PNG under <workdir>/landscape/.

    An unseen task uses the multi-task subspace and the vectors optimized in it for each method (the
    methods' points differ there); a seen task its single-task subspace and its solutions' vectors.
    """
    from .flatten import write_json
    from .landscape import path, plane, plot

    study.bind()
    task = study.cfg.task_names([task])[0]
    if method not in study.cfg.methods:
        raise ValueError(f"--method {method}: not a method of this study ({', '.join(study.cfg.methods)})")
    name = MULTI if task in study.cfg.unseen and study.cfg.unseen else SINGLE.format(task=task)
    space, data, head = study.space(name), study.data(task), study.head(task)
    if name == MULTI:
        rows = {r["method"]: r for r in study.store.rows("subspace_results", space=name, stage="optimize", task=task)}
        points = {m: torch.tensor(rows[m]["meta"]["z"]) for m in space.methods if m in rows}
    else:
        points = {m: space.vectors[(task, m)] for m in space.methods if (task, m) in space.vectors}
    if method not in points:
        raise ValueError(f"method {method!r} has no vector for {task!r} in {name}; run `optimize` first")
    order = [method] + [m for m in points if m != method]
    sample = data.eval[:examples]
    result = {
        "task": task,
        "space": name,
        "points": {m: points[m].tolist() for m in order},
        "plane": plane(study.bank, space, data.task, {m: points[m] for m in order}, method, head, sample, n=n),
        "paths": [path(study.bank, space, data.task, (method, points[method]), (m, points[m]), head, sample)
                  for m in order[1:]],
    }  # fmt: skip
    out = study.workdir / "landscape"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{task}-{method}"  # one figure per basis: another --method used to overwrite the first
    write_json(stem.with_suffix(".json"), result)
    plot(
        result,
        str(stem.with_suffix(".png")),
        f"{task}: subspace {name} (d={space.d}), {len(sample)} evaluation examples",
    )
    best = max(max(row) for row in result["plane"]["metric"])
    study.store.put(
        "subspace_results", space=name, stage="landscape", task=task, method=method, source=method, score=best,
        original=study.original(task, method), ratio=share(best, study.original(task, method)),
        meta={"json": str(stem.with_suffix(".json")), "png": str(stem.with_suffix(".png"))},
    )  # fmt: skip
    return result
