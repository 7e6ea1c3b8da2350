"""Stage 0: independent solutions of every method on every task, flattened, with the task's head.

Per task, the head is trained first on the frozen backbone (the head-only baseline) and then held
fixed while each method trains its delta: all methods of a task share one head, so a delta vector
means the same thing whichever method produced it, and the subspace covers only the delta.
Each method's initial delta is recorded too (same seed, same attach order, so the same random
numbers): subspaces are anchored there, and optimizing in them starts from the untrained method.

With several `solution_seeds`, each method trains once per seed. The seed varies the training
randomness (batch order, dropout), not the initial delta nor the head: every solution of a method
starts from the same initial delta (the study seed's), so all of them are displacements from one
anchor and a subspace found from some seeds' solutions is a space the others can be compared in.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import load_backbone, load_tokenizer
from ..core.io import HEAD
from ..core.model import DeltaModel
from ..train.evaluation import evaluate
from ..train.objectives import ClassifierObjective
from ..train.trainer import TrainConfig, fit
from .config import StudyConfig, TaskData, task_data
from .flatten import Layout, flatten, load_vectors, save_vectors
from .sources import checked, fingerprint
from .space import check_dimension
from .store import Store


@dataclasses.dataclass
class Solution:
    task: str
    method: str
    vector: torch.Tensor  # the trained delta, flattened
    init: torch.Tensor  # the delta before training (the anchor of every subspace)
    layout: Layout
    score: float  # primary metric on the task's eval sample

    @property
    def displacement(self) -> torch.Tensor:
        return self.vector - self.init


def backbone_for(cfg: StudyConfig, num_labels: int) -> nn.Module:
    """`cfg.model` with a head of `num_labels` outputs (1: regression).

    A checkpoint saved as a classifier of another class count (a 3-class NLI model for a 2-class task, or
    for the evaluation bank's 2) gets a new head, as `deltatune train` gives it: transformers refuses the
    mismatch otherwise. The study trains every task's head itself, so the checkpoint's head was only ever
    the starting point of that training.
    """
    from transformers import AutoConfig

    from ..backbones import model_path
    from ..train.own_head import saved_classifier

    head = "regression" if num_labels == 1 else "cls"
    config = AutoConfig.from_pretrained(model_path(cfg.model))
    extra = {"ignore_mismatched_sizes": True} if saved_classifier(config) and config.num_labels != num_labels else {}
    return load_backbone(cfg.model, head, num_labels=num_labels, **extra)


def _train_config(cfg: StudyConfig, lr: float | None, seed: int | None = None) -> TrainConfig:
    return TrainConfig(
        lr=lr,
        head_lr=cfg.head_lr,
        max_steps=cfg.steps,
        epochs=None,  # a fixed step budget: the study compares solutions trained alike
        patience=None,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        eval_every=cfg.eval_every,
        seed=cfg.seed if seed is None else seed,
        progress=False,
    )


def initial_state(dm: DeltaModel, name: str, config: Any, seed: int) -> dict[str, torch.Tensor]:
    """The delta `config` builds right after seeding, finalized: what training starts from."""
    torch.manual_seed(seed)
    dm.add(f"{name}_init", config)
    dm.delta(f"{name}_init").finalize()
    state = {k: v.clone() for k, v in dm.delta_state_dict(f"{name}_init").items()}
    dm.detach(f"{name}_init")
    return state


def _score(model: nn.Module, tokenizer: Any, data: TaskData, cfg: StudyConfig) -> dict[str, float]:
    objective = ClassifierObjective(data.task, tokenizer, cfg.max_length)
    return evaluate(model, objective, data.eval, data.task, 64)


def _head_path(workdir: Path, task: str) -> Path:
    return workdir / "heads" / f"{task}.safetensors"


def _solution_path(workdir: Path, task: str, method: str, seed: int | None = None) -> Path:
    """The study seed's solution keeps the name it had before studies had several seeds (None: that one)."""
    name = f"{method}.safetensors" if seed is None else f"{method}-seed{seed}.safetensors"
    return workdir / "solutions" / task / name


def collect_task(
    cfg: StudyConfig,
    store: Store,
    workdir: Path,
    name: str,
    tokenizer: Any,
    make_backbone: Callable[[int], nn.Module] | None = None,
) -> None:
    """Train (or skip, when the store has them) the head and every method's solution per seed on one task.

    `make_backbone(num_labels)` builds the model (default: `cfg.model`); tests pass tiny ones.
    """
    has_head = _stored(store, _head_path(workdir, name), name, "head", cfg.seed)
    todo = [
        (seed, m)
        for seed in cfg.seeds  # the study's seed first: the reference solutions exist before any other
        for m in cfg.methods  # a new head (its file was lost) means new solutions: they were trained with it
        if not has_head
        or not _stored(store, _solution_path(workdir, name, m, None if seed == cfg.seed else seed), name, m, seed)
    ]
    if not todo and has_head:
        return
    data = checked(task_data(name, cfg), name, recorded_data(store, name, cfg.seed))
    metric = data.task.primary_metric
    # the new head is drawn from the global RNG while the model loads: seeded, a task's head (and so its
    # solutions) is the same whether it is collected alone or after other tasks in one process (before: not)
    torch.manual_seed(cfg.seed)
    backbone = (make_backbone or (lambda n: backbone_for(cfg, n)))(data.task.num_labels)
    if has_head:
        head = load_head(workdir, name)
    else:
        start = time.perf_counter()
        model, result = fit(backbone, tokenizer, data.task, (), _train_config(cfg, None), train_head=True)
        head = {k.removeprefix(HEAD): v.clone() for k, v in model.head_state_dict().items()}
        save_vectors(_head_path(workdir, name), head, {"task": name})
        score = _score(model, tokenizer, data, cfg)[metric]
        store.put(
            "subspace_solutions", task=name, method="head", seed=cfg.seed, size=sum(v.numel() for v in head.values()),
            score=score, metric=metric, path=str(_head_path(workdir, name)),
            seconds=time.perf_counter() - start, meta={"dev": result.best, "data": fingerprint(data)},
        )  # fmt: skip
    params = dict(backbone.named_parameters())
    with torch.no_grad():
        for k, v in head.items():
            params[k].copy_(v)
    if todo:  # a --d no subspace of these deltas can have is refused before the first one trains
        sizes = {m: Layout.of(initial_state(DeltaModel(backbone), m, cfg.method_config(m), cfg.seed)).size
                 for m in dict.fromkeys(m for _, m in todo)}  # fmt: skip
        check_dimension(cfg.d, sizes)
    for seed, method in todo:
        start = time.perf_counter()
        config = cfg.method_config(method)
        dm = DeltaModel(backbone)
        init = initial_state(dm, method, config, cfg.seed)
        torch.manual_seed(cfg.seed)  # every seed's delta starts from the same initial delta: one anchor
        dm.add(method, config)
        train = _train_config(cfg, cfg.lrs.get(method), seed)  # the seed: batch order and dropout
        model, result = fit(dm, tokenizer, data.task, (), train, train_head=False)
        if result.diverged:  # the kept delta is the initial (or an early) one: every subspace would hold it
            raise ValueError(
                f"{method} on {name} (seed {seed}) diverged: {result.diverged.split(';')[0]}; nothing was stored. "
                f"Give {method} a lower rate (the study's `lrs`) in a new --workdir: solutions of one study are "
                "trained alike"
            )
        state = dm.delta_state_dict(method)
        layout = Layout.of(state)
        score = _score(model, tokenizer, data, cfg)[metric]
        path = _solution_path(workdir, name, method, None if seed == cfg.seed else seed)
        meta = {"task": name, "method": method, "seed": seed, "layout": layout.to_dict(), "config": config.to_dict(),
                "score": score}  # fmt: skip
        save_vectors(path, {"solution": flatten(state, layout), "init": flatten(init, layout)}, meta)
        store.put(
            "subspace_solutions", task=name, method=method, seed=seed, size=layout.size, score=score,
            metric=metric, path=str(path), seconds=time.perf_counter() - start,
            meta={"dev": result.best, "best_step": result.best_step, "diverged": result.diverged},
        )  # fmt: skip
        dm.detach(method)


def _stored(store: Store, path: Path, task: str, method: str, seed: int) -> bool:
    """Whether a head or solution is done: its row AND its file. A row whose file was deleted (to redo it) is
    redone, unless subspaces were found from the task: they hold the lost file's numbers, and redoing it
    beside them would mix two solutions in one study (before: collect skipped it, and find said the file
    was missing and to run collect, in a loop)."""
    if not store.has("subspace_solutions", task=task, method=method, seed=seed):
        return False
    if path.exists():
        return True
    used = sorted(r["name"] for r in store.rows("subspace_spaces") if task in {t.split("@")[0] for t in r["tasks"]})
    if used:
        raise ValueError(
            f"{path} is missing, and {', '.join(used[:3])}{' ...' if len(used) > 3 else ''} were found from it: "
            "restore the file, or start a new --workdir"
        )
    return False


def collect(
    cfg: StudyConfig,
    store: Store,
    workdir: str | os.PathLike,
    tasks: list[str] | None = None,
    tokenizer: Any = None,
    make_backbone: Callable[[int], nn.Module] | None = None,
) -> None:
    from tqdm.auto import tqdm

    workdir = Path(workdir)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    for name in tqdm(tasks or cfg.tasks, desc="collect", dynamic_ncols=True):
        collect_task(cfg, store, workdir, name, tokenizer, make_backbone)


def load_head(workdir: str | os.PathLike, task: str) -> dict[str, torch.Tensor]:
    tensors, _ = load_vectors(_head_path(Path(workdir), task), f"{task}'s trained head")
    return tensors


def load_solution(
    store: Store, task: str, method: str, seed: int, workdir: str | os.PathLike | None = None
) -> Solution:
    """The stored solution; with `workdir`, its file is looked up there rather than at the path the store holds.

    The store keeps the path as `collect` was given it, often relative to the folder it ran in: from another
    folder that path is missing, or names another study's file.
    """
    row = store.one("subspace_solutions", task=task, method=method, seed=seed)
    if row is None:
        raise FileNotFoundError(
            f"no {method} solution of seed {seed} for {task!r} in {store.path}; run `deltatune subspace collect`"
        )
    path = Path(row["path"]) if workdir is None else Path(workdir) / "solutions" / task / Path(row["path"]).name
    tensors, meta = load_vectors(path, f"a {method} solution of {task!r}", needs=("solution", "init"))
    if not isinstance(meta.get("layout"), dict):
        raise ValueError(f"{path} holds no delta layout: it was not written by `deltatune subspace collect`")
    layout = Layout.from_dict(meta["layout"])
    if layout.size != tensors["solution"].numel():
        raise ValueError(f"{path}: its layout has {layout.size} numbers and its solution {tensors['solution'].numel()}")
    return Solution(task, method, tensors["solution"], tensors["init"], layout, row["score"])


def recorded_data(store: Store, task: str, seed: int) -> str | None:
    """The fingerprint of the data `task` was collected on (None: not collected yet, or an older store)."""
    row = store.one("subspace_solutions", task=task, method="head", seed=seed)
    return (row["meta"] or {}).get("data") if row else None
