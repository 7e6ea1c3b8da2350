"""Intrinsic dimension of a task: the smallest d whose SAID training reaches 90% of a full delta.

Each point of the search is one short run of the library's `said` method (a d-dim vector projected
onto the query and value weights by Fastfood, Aghajanyan et al.) through `deltatune.train.fit`, with
the task's fixed head, scored on the task's evaluation sample. The search doubles d (x4) from
`d_min` until a run reaches the target, then bisects (in log2 d) between the last miss and the
first hit. The target is 90% of the delta's *gain over the fixed head*: the heads here are trained,
so on most tasks the head alone already scores above 90% of the delta and the raw criterion would
be met at any d; the gain criterion keeps d90 informative (the raw ratios are stored too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from .store import Store, share

Measure = Callable[[int], float]


def search_d90(
    measure: Measure,
    reference: float,
    baseline: float,
    *,
    d_min: int = 16,
    d_max: int = 4096,
    factor: int = 4,
    bisect_steps: int = 2,
    threshold: float = 0.9,
    known: dict[int, float] | None = None,
) -> tuple[int | None, dict[int, float]]:
    """(d90 or None when d_max misses, every measured {d: score}); `known` scores are reused, not re-run."""
    if reference <= baseline:
        raise ValueError(
            f"the reference score {reference:.4f} does not beat the fixed head's {baseline:.4f}: "
            "there is no gain to recover; train the solutions longer"
        )
    scores = dict(known or {})
    target = baseline + threshold * (reference - baseline)

    def hit(d: int) -> bool:
        if d not in scores:
            scores[d] = measure(d)
        return scores[d] >= target

    miss, d = 0, min(d_min, d_max)  # a cap below the first size measures at the cap (it trained SAID at 16 for 8)
    while not hit(d):
        miss = d
        if d >= d_max:
            return None, scores
        d = min(d * factor, d_max)
    lo, hi = miss, d
    for _ in range(bisect_steps):
        if lo == 0 or hi - lo <= 1:
            break
        mid = int(round(2 ** ((math.log2(lo) + math.log2(hi)) / 2)))
        if mid in (lo, hi):
            break
        if hit(mid):
            hi = mid
        else:
            lo = mid
    return hi, scores


SAID_TARGETS = ("attn.q", "attn.v")  # the query and value weights and biases, as Aghajanyan et al.'s BERT runs


def said_capacity(backbone: Any, seed: int) -> int:
    """How many values SAID moves on `backbone`: an intrinsic dimension above it is no subspace (SAID refuses it)."""
    from ..core.model import DeltaModel
    from ..methods import get_config

    dm = DeltaModel(backbone)
    delta = dm.add("said", get_config("said", dim=1, targets=SAID_TARGETS, seed=seed)).delta("said")
    total = sum(p.D for p in delta.projections)
    dm.detach("said")
    return total


def said_measure(
    cfg,
    store: Store,
    workdir,
    task: str,
    tokenizer,
    reference: float,
    make_backbone,
    steps: int,
) -> Measure:
    """A function d -> score that trains SAID at dimension d for `steps` and stores the run with that budget."""
    import torch

    from ..core.model import DeltaModel
    from ..methods import get_config
    from ..train.trainer import TrainConfig, fit
    from .collect import _score, load_head, recorded_data
    from .config import task_data
    from .sources import checked

    data = checked(task_data(task, cfg), task, recorded_data(store, task, cfg.seed))
    head = load_head(workdir, task)

    def measure(d: int) -> float:
        start = time.perf_counter()
        backbone = make_backbone(data.task.num_labels)
        params = dict(backbone.named_parameters())
        with torch.no_grad():
            for k, v in head.items():
                params[k].copy_(v)
        dm = DeltaModel(backbone)
        dm.add("said", get_config("said", dim=d, targets=SAID_TARGETS, seed=cfg.seed))
        train = TrainConfig(
            max_steps=steps, epochs=None, patience=None, batch_size=cfg.batch_size, max_length=cfg.max_length,
            eval_every=cfg.eval_every, seed=cfg.seed, progress=False,
        )  # fmt: skip
        model, _ = fit(dm, tokenizer, data.task, (), train, train_head=False)
        score = _score(model, tokenizer, data, cfg)[data.task.primary_metric]
        store.put(
            "subspace_intrinsic", task=task, d=d, steps=steps, score=score, reference=reference,
            ratio=share(score, reference), seconds=time.perf_counter() - start,
        )  # fmt: skip
        return score

    return measure
