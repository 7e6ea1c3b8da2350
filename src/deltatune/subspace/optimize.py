"""Stage 2: train only a d-dimensional vector through one method's frozen subspace; and cross-method transfer.

The vector starts at zero (the method's initial delta, the subspace's anchor) and is trained with
Adam on the task's few-shot training set; like `deltatune.train.fit`, the best vector on the few-shot
dev set is kept, and it is scored on the task's held-out evaluation sample, the same sample the
original solution was scored on, so "% of the original" compares like with like.
Transfer takes the vector found through method A's basis and evaluates it through method B's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from .config import TaskData
from .functional import Bank, batches
from .space import Space


def optimize_vector(
    bank: Bank,
    space: Space,
    method: str,
    data: TaskData,
    head: Mapping[str, torch.Tensor],
    *,
    steps: int = 60,
    lr: float = 0.05,
    batch_size: int = 16,
    eval_every: int = 20,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, float], dict]:
    """The best d-dim vector found, its metrics on the evaluation sample, and a record of the run."""
    torch.manual_seed(seed)
    task = data.task
    metric = task.primary_metric
    z = torch.zeros(space.d, requires_grad=True)
    optimizer = torch.optim.Adam([z], lr=lr)
    stream = batches(bank, task, task["train"], batch_size, seed)
    dev = task["dev"] or task["train"]
    best_z, best_dev, best_step, history = z.detach().clone(), -float("inf"), 0, []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = bank.loss(method, space.point(method, z), head, next(stream))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            score = bank.evaluate(method, space.point(method, z.detach()), head, task, dev)[metric]
            history.append({"step": step, "loss": float(loss.detach()), "dev": score})
            if score > best_dev:
                best_z, best_dev, best_step = z.detach().clone(), score, step
    metrics = bank.evaluate(method, space.point(method, best_z), head, task, data.eval)
    record = {
        "z": best_z.tolist(),
        "dev": best_dev,
        "best_step": best_step,
        "history": history,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return best_z, metrics, record


def transfer_scores(
    bank: Bank, space: Space, z: torch.Tensor, source: str, data: TaskData, head: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """The primary metric of `z` (found through `source`) evaluated through every other method's basis."""
    metric = data.task.primary_metric
    return {
        m: bank.evaluate(m, space.point(m, z), head, data.task, data.eval)[metric] for m in space.methods if m != source
    }
