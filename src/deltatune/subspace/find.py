"""Stage 1: find the unified subspace (Yi et al.) from independent solutions of several methods.

Each method m gets a down-projection (Linear -> tanh -> Linear, solution -> d numbers) and an
up-projection (d numbers -> solution, linear, around the method's initial delta). Trained jointly:
for a task t, every method's solution is projected down; the intrinsic vectors are mixed with
random (Dirichlet) weights, and the mix is projected up through EVERY method and scored with the
task loss, so one point of the d-dim space has to be a good solution for all methods at once;
alpha x the relative distance between each solution and its own reconstruction keeps the
projections faithful. Single-task: one task; multi-task: a task per step, one intrinsic vector
per (task, method). Both projections start from the joint decomposition of all methods' solutions
(one SVD of the solutions stacked method over method: up = each method's block of the leading
directions, down = the pseudo-inverse, giving every task one shared coordinate vector), a warm start
that a CPU budget of tens of steps needs; training then moves them with the task loss and the
mixing; the up-projections become the subspace's bases. `init="random"` trains them from scratch
instead, as the paper does (random orthonormal up-projections, default-initialized down-projections):
the warm start puts a single task's solutions into the subspace by construction, so only from-scratch
projections say how much of a solution the *learned* subspace holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .collect import Solution
from .config import TaskData
from .functional import Bank, batches
from .space import Space, check_dimension, orthonormal_completion, top_directions

_TANH_GAIN = 0.1  # PCA coordinates of unit-norm inputs, scaled into tanh's near-linear range
# Adam rates per init (measured on planted subspaces: from scratch, 5x and 10x the warm start's rates
# reach < 5% reconstruction error in 300 steps where the warm start's leave 50%); `first` scales the
# first down layer's rate (the warm start's rows are tanh-scaled, so their steps are too)
INITS = {
    "joint": {"lr": 1e-3, "up_lr": 5e-3, "first": _TANH_GAIN},
    "random": {"lr": 5e-3, "up_lr": 5e-2, "first": 1.0},
}


class Unified(nn.Module):
    def __init__(self, sizes: Mapping[str, int], d: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, d)) for m, D in sizes.items()}
        )
        self.up = nn.ModuleDict({m: nn.Linear(d, D, bias=False) for m, D in sizes.items()})


def _anchors(solutions: Mapping[tuple[str, str], Solution], methods: Sequence[str]) -> dict[str, torch.Tensor]:
    """The initial delta of each method: the same on every task (same seed), checked rather than assumed."""
    anchors: dict[str, torch.Tensor] = {}
    for (task, method), sol in solutions.items():
        if method not in anchors:
            anchors[method] = sol.init
        elif not torch.allclose(anchors[method], sol.init, atol=1e-6):
            raise ValueError(
                f"the initial {method} delta of {task!r} differs from another task's; collect every task "
                "with the same seed and method settings"
            )
    return {m: anchors[m] for m in methods}


def joint_directions(
    disp: Mapping[tuple[str, str], torch.Tensor], tasks: Sequence[str], methods: Sequence[str], d: int, seed: int
) -> dict[str, torch.Tensor]:
    """Each method's block of the d leading directions of ALL methods' solutions stacked task by task.

    One SVD of the (sum of D_m, tasks) matrix gives every task ONE coordinate vector shared by all
    methods: the joint decomposition of the paper, solved in closed form. Blocks are scaled so their
    columns have about unit norm (each method's normalized solutions weigh the same).
    """
    blocks = [torch.stack([disp[(t, m)] for t in tasks], dim=1) for m in methods]
    directions = top_directions(torch.cat(blocks, dim=0), d, seed) * math.sqrt(len(methods))
    return dict(zip(methods, torch.split(directions, [b.shape[0] for b in blocks]), strict=True))


def check_solutions(
    solutions: Mapping[tuple[str, str], Solution], tasks: Sequence[str], methods: Sequence[str], d: int
) -> None:
    """What every finder (unified, PCA, random) needs of its solutions, said in one line that names the solution.

    From Python these reached torch's SVD error (a NaN solution), a NaN basis (the random one), a method dropped
    from the subspace without a word (one task lacked it), zero-column bases (d = 0), or a solution that never
    moved from its initial delta (its training diverged at once) scaled to 1e-8 and reported at 100% everywhere.
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d={d!r}: a subspace has at least one dimension; pass a whole number >= 1")
    if not tasks or not methods:
        raise ValueError("finding a subspace needs at least one task with solutions of every method; run collect")
    if len(set(tasks)) < len(tasks):
        twice = next(t for t in tasks if list(tasks).count(t) > 1)
        raise ValueError(f"task {twice!r} is listed twice: each solution set counts once; list it once")
    sizes: dict[str, int] = {}
    for m in methods:
        for t in tasks:
            sol = solutions.get((t, m))
            if sol is None:
                raise ValueError(
                    f"no {m} solution for {t!r}: a subspace holds every method on every task it is found from; "
                    f"collect it, or leave {m} (or {t!r}) out"
                )
            n = sizes.setdefault(m, sol.vector.numel())
            if sol.vector.numel() != n or sol.init.numel() != n:
                raise ValueError(
                    f"the {m} solution of {t!r} has {sol.vector.numel()} numbers (initial delta {sol.init.numel()}), "
                    f"another task's {n}: solutions of one method need the same settings; collect them alike"
                )
            if not bool(torch.isfinite(sol.vector).all()):
                raise ValueError(
                    f"the {m} solution of {t!r} holds NaN or infinite values (its training diverged); train it again "
                    "with a lower rate"
                )
            if not bool(sol.displacement.any()):
                raise ValueError(
                    f"the {m} solution of {t!r} equals its initial delta: it never moved (its training diverged at "
                    "once, or took no step); train it again with a lower rate"
                )
    check_dimension(d, sizes)


def method_scales(solutions: Mapping[tuple[str, str], Solution], methods: Sequence[str]) -> dict[str, float]:
    """Mean norm of each method's displacement from its initial delta over the given solutions."""
    scales = {}
    for m in methods:
        norms = [float(s.displacement.norm()) for (_, sm), s in solutions.items() if sm == m]
        scales[m] = max(sum(norms) / len(norms), 1e-8)
    return scales


def find_unified(
    bank: Bank,
    solutions: Mapping[tuple[str, str], Solution],
    data: Mapping[str, TaskData],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    name: str,
    d: int = 4,
    hidden: int = 64,
    steps: int = 40,
    alpha: float = 1.0,
    batch_size: int = 16,
    lr: float | None = None,
    up_lr: float | None = None,
    seed: int = 0,
    init: str = "joint",
    log: list | None = None,
) -> Space:
    """Train the projections on the solutions of `data`'s tasks; return the subspace with each solution's z.

    `data`'s keys name solution sets: a task, or one seed's solutions of a task (`task@seed`, sharing the
    task's data and head); each set gets its own intrinsic vector, as a task does.

    `init` is "joint" (warm start from the joint decomposition) or "random" (from scratch); `lr` (the last
    down layer) and `up_lr` (per entry x sqrt of the method's size) default to that init's rates.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    lr, up_lr = lr or INITS[init]["lr"], up_lr or INITS[init]["up_lr"]
    tasks, methods = list(data), list(bank.methods)
    check_solutions(solutions, tasks, methods, d)
    torch.manual_seed(seed)
    anchors = _anchors({k: v for k, v in solutions.items() if k[0] in tasks}, methods)
    scales = method_scales({k: v for k, v in solutions.items() if k[0] in tasks}, methods)
    disp = {(t, m): solutions[(t, m)].displacement / scales[m] for t in tasks for m in methods}
    if hidden < d:
        raise ValueError(f"the down-projections' width ({hidden}) must be at least d ({d}); raise --hidden")
    model = Unified({m: anchors[m].numel() for m in methods}, d, hidden)
    with torch.no_grad():
        if init == "random":  # unit-norm random directions, so z of order one is a solution-sized step
            for i, m in enumerate(methods):
                model.up[m].weight.copy_(orthonormal_completion(torch.zeros(anchors[m].numel(), 0), d, seed + i))
        else:  # warm start: the joint decomposition (up) and its coordinates (down, tanh near-linear)
            for m, directions in joint_directions(disp, tasks, methods, d, seed).items():
                model.up[m].weight.copy_(directions)
                first, last = model.down[m][0], model.down[m][2]
                first.weight[:d] = _TANH_GAIN * torch.linalg.pinv(directions)
                first.bias.zero_()
                last.weight.zero_()
                last.weight[:, :d] = torch.eye(d) / _TANH_GAIN
                last.bias.zero_()
    # Adam moves every entry by about its rate: layers whose rows are unit vectors over D entries
    # (up-projections, the first down layer) need rates of order 1/sqrt(D) or one step erases them
    groups = []
    for m in methods:
        per_entry = up_lr / math.sqrt(anchors[m].numel())
        groups += [
            {"params": model.up[m].parameters(), "lr": per_entry},
            {"params": model.down[m][0].parameters(), "lr": INITS[init]["first"] * per_entry},
            {"params": model.down[m][2].parameters(), "lr": lr},
        ]
    optimizer = torch.optim.Adam(groups)
    streams = {t: batches(bank, data[t].task, data[t].task["train"], batch_size, seed) for t in tasks}
    dirichlet = torch.distributions.Dirichlet(torch.ones(len(methods)))
    start = time.perf_counter()
    for step in range(steps):
        task = tasks[step % len(tasks)]
        batch = next(streams[task])
        z = {m: model.down[m](disp[(task, m)]) for m in methods}
        weights = dirichlet.sample()
        mixed = sum(w * z[m] for w, m in zip(weights, methods, strict=True))
        task_loss = sum(bank.loss(m, anchors[m] + scales[m] * model.up[m](mixed), heads[task], batch) for m in methods)
        distance = sum(
            (model.up[m](z[m]) - disp[(task, m)]).pow(2).sum() / disp[(task, m)].pow(2).sum().clamp_min(1e-12)
            for m in methods
        )
        loss = task_loss + alpha * distance
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log is not None:
            log.append(
                {"step": step + 1, "task": task, "task_loss": float(task_loss.detach()) / len(methods),
                 "distance": float(distance.detach()) / len(methods), "elapsed": round(time.perf_counter() - start, 1)}
            )  # fmt: skip
    with torch.no_grad():
        vectors = {(t, m): model.down[m](disp[(t, m)]).detach().clone() for t in tasks for m in methods}
        bases = {m: scales[m] * model.up[m].weight.detach().clone() for m in methods}
        errors = {
            f"{t}/{m}": float((bases[m] @ vectors[(t, m)] - solutions[(t, m)].displacement).norm())
            / max(float(solutions[(t, m)].displacement.norm()), 1e-12)
            for t in tasks
            for m in methods
        }
    meta = {"scales": scales, "relative_error": errors, "steps": steps, "alpha": alpha, "d": d, "init": init}
    return Space(name, "unified", anchors, bases, vectors, tasks, meta)
