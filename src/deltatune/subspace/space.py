"""A subspace of every method's solution space: x = anchor + basis @ z, with z the same d numbers for all.

Whatever found it (the learned unified projections, PCA, a random Fastfood projection), a subspace
is stored the same way, so optimization, transfer and the landscape treat them alike. The anchor is
the method's initial delta (training in the subspace starts from the untrained method), and each
basis is scaled by the typical norm of the method's solution displacements, so that z of order one
means a solution-sized step for every method and one learning rate serves all.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .flatten import load_vectors, save_vectors


@dataclasses.dataclass
class Space:
    name: str
    kind: str  # unified, pca or random
    anchors: dict[str, torch.Tensor]  # method -> (D,)
    bases: dict[str, torch.Tensor]  # method -> (D, d)
    vectors: dict[tuple[str, str], torch.Tensor] = dataclasses.field(default_factory=dict)  # (task, method) -> z
    tasks: list[str] = dataclasses.field(default_factory=list)  # what it was found on
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def d(self) -> int:
        return next(iter(self.bases.values())).shape[1]

    @property
    def methods(self) -> list[str]:
        return list(self.bases)

    def point(self, method: str, z: torch.Tensor) -> torch.Tensor:
        """The method's flat delta at coordinates z (differentiable in z)."""
        if method not in self.bases:
            raise KeyError(f"subspace {self.name!r} has no method {method!r}; it has {', '.join(self.bases)}")
        if z.shape != (self.d,):
            raise ValueError(f"subspace {self.name!r} is {self.d}-dimensional, got a vector of shape {tuple(z.shape)}")
        return self.anchors[method] + self.bases[method] @ z

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"{m}.anchor": a for m, a in self.anchors.items()}
        tensors |= {f"{m}.basis": b for m, b in self.bases.items()}
        tensors |= {f"z.{t}.{m}": z for (t, m), z in self.vectors.items()}
        meta = {"name": self.name, "kind": self.kind, "tasks": self.tasks, "methods": self.methods, **self.meta}
        save_vectors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Space:
        tensors, meta = load_vectors(path, "a subspace (`deltatune subspace find` writes them)")
        if not {"name", "kind", "tasks", "methods"} <= meta.keys() or not all(
            f"{m}.anchor" in tensors and f"{m}.basis" in tensors for m in meta["methods"]
        ):
            raise ValueError(
                f"{path} is not a subspace (`deltatune subspace find` writes them): delete it and find it again"
            )
        methods = meta["methods"]
        vectors = {}
        for key, z in tensors.items():
            if key.startswith("z."):
                task, method = key[2:].rsplit(".", 1)
                vectors[(task, method)] = z
        extra = {k: v for k, v in meta.items() if k not in ("name", "kind", "tasks", "methods")}
        return cls(
            meta["name"],
            meta["kind"],
            {m: tensors[f"{m}.anchor"] for m in methods},
            {m: tensors[f"{m}.basis"] for m in methods},
            vectors,
            meta["tasks"],
            extra,
        )


def space_path(workdir: str | os.PathLike, name: str) -> Path:
    return Path(workdir) / "spaces" / f"{name}.safetensors"


# How the pipeline names the subspaces it finds; `space_kind` is the one place that reads a name back.
SINGLE = "unified-{task}"
MULTI = "unified-multi"
SCRATCH_SINGLE = "scratch-{task}"  # the same, with projections trained from scratch (`find --init random`)
SCRATCH_MULTI = "scratch-multi"
# a task's subspace found from its solutions of every seed but the study's (`find --which heldout`), and from scratch
HELDOUT = "heldout-{task}"
SCRATCH_HELDOUT = "scratch-heldout-{task}"


def space_kind(name: str) -> str:
    """What `--spaces` selects and the report groups by: single (unified-<task>), multi (unified-multi),
    heldout (heldout-<task>), their from-scratch counterparts scratch-single (scratch-<task>), scratch-multi
    and scratch-heldout (scratch-heldout-<task>), pca or random."""
    if name in (MULTI, SCRATCH_MULTI):
        return name.replace("unified-", "")
    if name.startswith("unified-"):
        return "single"
    if name.startswith("scratch-heldout-"):
        return "scratch-heldout"
    if name.startswith("heldout-"):
        return "heldout"
    return "scratch-single" if name.startswith("scratch-") else name


def check_dimension(d: int, sizes: dict[str, int]) -> None:
    """A d-dimensional subspace of a method's solutions needs d independent directions among its D numbers.

    With d > D the bases came out D columns wide for that method and d for the others: `optimize` failed
    midway with torch's "size mismatch, got input (2560), mat (2560x2560), vec (2664)", rows already written.
    """
    small = {m: n for m, n in sizes.items() if n < d}
    if small:
        m, n = min(small.items(), key=lambda kv: kv[1])
        raise ValueError(
            f"--d {d} is larger than the {m} delta's {n} numbers: a subspace cannot have more dimensions than the "
            f"space it lies in; use --d {n} or less (or larger {m} settings)"
        )


def orthonormal_completion(basis: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """`basis` (D, k) with orthonormal columns, completed to d columns by random orthonormal directions."""
    D, k = basis.shape
    if d > D:  # QR would give D columns, not d (check_dimension says it in the user's terms first)
        raise ValueError(f"cannot complete {d} orthonormal directions in {D} dimensions")
    if k >= d:
        return basis[:, :d]
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(D, d - k, generator=g)
    q, _ = torch.linalg.qr(torch.cat([basis, extra], dim=1))
    q[:, :k] = basis  # QR may flip signs of the given directions; keep them as they were
    return q


def top_directions(displacements: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """The d leading left singular vectors of the (D, n) displacements, padded when n < d."""
    u, s, _ = torch.linalg.svd(displacements, full_matrices=False)
    keep = u[:, : min(d, int((s > 1e-8 * s.max().clamp_min(1e-30)).sum()))]
    return orthonormal_completion(keep, d, seed)
