"""Baseline subspaces of the same dimension d, stored like the unified one so every stage treats them alike.

- PCA: the d leading principal directions of the methods' collected solutions (displacements from the
  initial delta, uncentered, as the unified subspace is a linear space around the same anchor). It asks
  how much of the unified subspace is just "where the solutions already lie".
- Random: a Fastfood projection (the structured random projection of SAID and of Li et al.'s intrinsic
  dimension) materialized as d columns: a subspace that knows nothing about the task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..core.fastfood import Fastfood
from .collect import Solution
from .find import _anchors, check_solutions, method_scales
from .space import Space, top_directions


def pca_space(
    solutions: Mapping[tuple[str, str], Solution], tasks: Sequence[str], methods: Sequence[str], d: int, seed: int = 0
) -> Space:
    check_solutions(solutions, tasks, methods, d)
    chosen = {k: v for k, v in solutions.items() if k[0] in tasks and k[1] in methods}
    anchors, scales = _anchors(chosen, methods), method_scales(chosen, methods)
    bases = {}
    for i, m in enumerate(methods):
        stacked = torch.stack([solutions[(t, m)].displacement for t in tasks], dim=1)
        bases[m] = scales[m] * top_directions(stacked, d, seed + i)
    return Space("pca", "pca", anchors, bases, {}, list(tasks), {"scales": scales, "d": d})


def fastfood_basis(D: int, d: int, seed: int) -> torch.Tensor:
    """The (D, d) matrix of a Fastfood projection R^d -> R^D: its columns are the images of the unit vectors."""
    with torch.no_grad():
        return Fastfood(d, D, seed=seed)(torch.eye(d)).T.contiguous()


def random_space(
    solutions: Mapping[tuple[str, str], Solution], tasks: Sequence[str], methods: Sequence[str], d: int, seed: int = 0
) -> Space:
    """Random directions; only the anchors and the step scale come from the (training) solutions."""
    check_solutions(solutions, tasks, methods, d)
    chosen = {k: v for k, v in solutions.items() if k[0] in tasks and k[1] in methods}
    anchors, scales = _anchors(chosen, methods), method_scales(chosen, methods)
    bases = {m: scales[m] * fastfood_basis(anchors[m].numel(), d, seed + i) for i, m in enumerate(methods)}
    return Space("random", "random", anchors, bases, {}, list(tasks), {"scales": scales, "d": d})
