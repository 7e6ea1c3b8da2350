"""The study as a grid of runs: its checked form (`StudySpec`) and the jobs it expands into.

Kept apart from spec.py (which reads and checks a spec) because everything after the check (the runner
claiming jobs, the analyses ordering rows, the report) needs only this: what a run is called, what
it trains, and in which order the runs come, with no knowledge of how a spec file is written.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from .lr_grid import LRGrid, grid_key, lr_group, rate_field


@dataclasses.dataclass
class Method:
    """One column of the study: a label ("lora", "prompt+bitfit", "full", "head") and how to train it."""

    label: str
    configs: dict[str, dict[str, Any]]  # method name -> its settings; empty for the baselines
    lr: float | None = None
    budget: int | None = None

    @property
    def full(self) -> bool:
        return self.label.split("@")[0] == "full"


@dataclasses.dataclass
class StudySpec:
    name: str
    models: list[str]
    tasks: list[str]
    methods: list[Method]
    seeds: list[int] = dataclasses.field(default_factory=lambda: [42])
    k_shot: int | None = None
    max_train: int | None = None
    quantize: str | None = None  # "4bit"/"8bit": every run on the backbone quantized by bitsandbytes
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    analyses: list[str] = dataclasses.field(default_factory=lambda: ["performance", "convergence", "efficiency"])
    combination: list[str] = dataclasses.field(default_factory=list)  # methods whose subsets are compared
    transfer_tasks: list[str] = dataclasses.field(default_factory=list)
    transfer_methods: list[str] = dataclasses.field(default_factory=list)
    eval_test: bool = True
    threads: int | None = None
    description: str = ""
    lr_grid: LRGrid | None = None
    more_seeds: list[int] = dataclasses.field(default_factory=list)  # extra seeds, run after every first-seed run
    more_seeds_tasks: list[str] = dataclasses.field(default_factory=list)
    task_train: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per-task TrainConfig overrides
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    def jobs(self) -> list[dict[str, Any]]:
        """Every run of the study as a JSON-able job, in the order they should run.

        The learning-rate grid first (its choices gate the main runs), then the first seed on every
        task, task by task (so rows of the table complete early), then the further seeds, then
        `more_seeds` on their tasks; transfer runs name the run they start from.
        """
        base = {(m.label, m.label): m for m in self.methods}
        for subset in combination_labels(self.combination) if self.combination else []:
            if subset not in {lbl for lbl, _ in base}:
                names = subset.split("+") if subset != "head" else []
                cfg = {n: self._method_settings(n) for n in names}
                base[(subset, subset)] = Method(subset, cfg)
        jobs = self._grid_jobs()
        for seed, model, task, (label, _) in itertools.product(self.seeds, self.models, self.tasks, base):
            jobs.append(self._job(model, task, base[(label, label)], seed))
        for seed, model, task, (label, _) in itertools.product(
            self.more_seeds, self.models, self.more_seeds_tasks, base
        ):
            job = self._job(model, task, base[(label, label)], seed)
            if all(j["key"] != job["key"] for j in jobs):
                jobs.append(job)
        by_label = {lbl: m for (lbl, _), m in base.items()}
        for model, method_label, seed in itertools.product(self.models, self.transfer_methods, self.seeds):
            method = by_label[method_label]
            for task in self.transfer_tasks:  # the from-scratch runs the gains are measured against
                job = self._job(model, task, method, seed)
                if all(j["key"] != job["key"] for j in jobs):
                    jobs.append(job)
            for source, target in itertools.permutations(self.transfer_tasks, 2):
                job = self._job(model, target, method, seed)
                job["source_task"] = source
                job["depends_on"] = run_key(model, source, method.label, seed)
                job["key"] = run_key(model, target, method.label, seed, source)
                jobs.append(job)
        return jobs

    def _method_settings(self, name: str) -> dict[str, Any]:
        """A combined method's settings: its own column's (`lora`, never a variant such as `lora@r16`, which gave
        the combination r=16 beside a `lora` column of r=4), else `combination.configs`."""
        for m in self.methods:
            if m.label == name:
                return dict(m.configs[name])
        return dict(self.raw.get("combination", {}).get("configs", {}).get(name) or {})

    def _grid_jobs(self) -> list[dict[str, Any]]:
        if self.lr_grid is None:
            return []
        jobs = []
        by_label = {m.label: m for m in self.methods}
        for model, (label, rates) in itertools.product(self.models, self.lr_grid.rates.items()):
            for task, lr in itertools.product(self.lr_grid.tasks, rates):
                job = self._job(model, task, by_label[label], self.lr_grid.seed, lr=lr)
                job["key"] = grid_key(job["key"], lr)
                job["lr_group"] = lr_group(model, label)
                jobs.append(job)
        return jobs

    def _job(self, model: str, task: str, method: Method, seed: int, lr: float | None = None) -> dict[str, Any]:
        train = {**self.train, **self.task_train.get(task_name(task), {}), "seed": seed}
        lr = lr if lr is not None else method.lr
        if lr is not None:
            train[rate_field(method.label)] = lr
        job_extra = {}
        if lr is None and self.lr_grid is not None and method.label in self.lr_grid.rates:
            job_extra["lr_from"] = lr_group(model, method.label)  # the rate is the grid's choice, set at claim time
        return job_extra | {
            "key": run_key(model, task, method.label, seed),
            "model": model,
            "task": task,
            "label": method.label,
            "methods": method.configs,
            "full": method.full,
            "budget": method.budget,
            "seed": seed,
            "k_shot": self.k_shot,
            "max_train": self.max_train,
            "quantize": self.quantize,
            "train": train,
            "eval_test": self.eval_test,
            "threads": self.threads,
            "source_task": None,
            "depends_on": None,
        }


def task_name(task: str) -> str:
    return Path(task).name


def run_key(model: str, task: str, label: str, seed: int, source: str | None = None) -> str:
    where = f"{task_name(source)}->{task_name(task)}" if source else task_name(task)
    return f"{Path(model).name}/{where}/{label}/s{seed}"


def combination_labels(methods: list[str]) -> list[str]:
    """Every subset in the paper's row order: with [P, B, A], none, A, B, B+A, P, P+A, P+B, P+B+A."""
    rows = []
    n = len(methods)
    for bits in range(2**n):
        chosen = [m for i, m in enumerate(methods) if bits >> (n - 1 - i) & 1]
        rows.append("+".join(chosen) or "head")
    return rows
