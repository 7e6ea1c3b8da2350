"""The metric and loss landscape of a subspace: a 2-D plane through the methods' points, and straight paths.

The plane passes through z = 0 (every method untrained) and the methods' vectors: one axis along
their mean, one across their spread, so the grid shows the untrained start, the found points and the
region around them; every grid point is scored through one method's basis. Paths interpolate z linearly between two
methods' vectors and score each point through both methods: a flat, high path is the paper's
"a large region of the subspace performs well for all methods".
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..core import atomic
from ..data.tasks import Example, Task
from .functional import Bank
from .space import Space


@torch.no_grad()
def score_point(
    bank: Bank, space: Space, method: str, z: torch.Tensor, head: Mapping, task: Task, examples: Sequence[Example]
) -> tuple[float, float]:
    """(primary metric, mean loss) of z through `method` on `examples`."""
    vector = space.point(method, z)
    batch = bank.collate(task, list(examples))
    logits = bank.logits(method, vector, head, batch).float()
    labels = batch["labels"]
    if task.type == "regression":
        loss = F.mse_loss(logits[:, 0], labels)
        predictions = logits[:, 0].tolist()
    else:
        loss = F.cross_entropy(logits, labels)
        predictions = logits.argmax(-1).tolist()
    from ..data.metrics import compute_metrics

    return compute_metrics(task, predictions, list(examples))[task.primary_metric], float(loss)


def plane(
    bank: Bank,
    space: Space,
    task: Task,
    points: Mapping[str, torch.Tensor],
    method: str,
    head: Mapping,
    examples: Sequence[Example],
    n: int = 5,
) -> dict:
    """A grid over the plane through z = 0 (the untrained methods) and the methods' vectors; scored through `method`.

    Axis 1 is the mean of the vectors (its unit: the mean itself); axis 2 the spread between the first
    two vectors, orthogonalized and given the same length (a subspace axis when they coincide).
    """
    names = list(points)
    if len(names) < 2:
        raise ValueError("a landscape plane needs the vectors of at least two methods")
    e1 = torch.stack([points[m] for m in names]).mean(0)
    e2 = points[names[1]] - points[names[0]]
    e2 = e2 - (e2 @ e1) / (e1 @ e1).clamp_min(1e-12) * e1
    if e2.norm() < 1e-3 * e1.norm():  # the vectors coincide: show the subspace direction least like e1
        axis = torch.zeros_like(e1)
        axis[int(e1.abs().argmin())] = 1.0
        e2 = axis - (axis @ e1) / (e1 @ e1).clamp_min(1e-12) * e1
    e2 = e2 * e1.norm() / e2.norm()
    along, across = torch.linspace(-0.5, 1.5, n).tolist(), torch.linspace(-1.0, 1.0, n).tolist()
    metric = [[0.0] * n for _ in range(n)]
    loss = [[0.0] * n for _ in range(n)]
    for i, b in enumerate(across):
        for j, a in enumerate(along):
            metric[i][j], loss[i][j] = score_point(bank, space, method, a * e1 + b * e2, head, task, examples)
    marks = {"z=0": (0.0, 0.0)}
    for name, z in points.items():  # where each method's vector falls in plane coordinates
        marks[name] = (float(z @ e1 / (e1 @ e1)), float(z @ e2 / (e2 @ e2)))
    return {"method": method, "axes": names, "along": along, "across": across, "metric": metric, "loss": loss,
            "marks": marks}  # fmt: skip


def path(
    bank: Bank,
    space: Space,
    task: Task,
    a: tuple[str, torch.Tensor],
    b: tuple[str, torch.Tensor],
    head: Mapping,
    examples: Sequence[Example],
    n: int = 7,
) -> dict:
    """Scores along z(l) = (1 - l) z_a + l z_b, through method a's basis and method b's."""
    lambdas = torch.linspace(0, 1, n).tolist()
    out: dict = {"from": a[0], "to": b[0], "lambdas": lambdas, "metric": {}, "loss": {}}
    for method in dict.fromkeys((a[0], b[0])):
        scored = [score_point(bank, space, method, (1 - t) * a[1] + t * b[1], head, task, examples) for t in lambdas]
        out["metric"][method] = [s[0] for s in scored]
        out["loss"][method] = [s[1] for s in scored]
    return out


def plot(result: dict, path_png: str, title: str) -> None:
    """One figure: the plane's metric heatmap (methods' vectors marked) beside the interpolation paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    grid = result["plane"]
    along, across = grid["along"], grid["across"]
    im = ax1.imshow(
        grid["metric"], origin="lower", extent=(along[0], along[-1], across[0], across[-1]), cmap="viridis",
        aspect="auto",
    )  # fmt: skip
    fig.colorbar(im, ax=ax1, label="metric")
    for name, (x, y) in grid["marks"].items():
        ax1.plot(x, y, "o", color="white", markeredgecolor="black")
        ax1.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), color="white")
    ax1.set_title(f"metric through {grid['method']}'s basis", fontsize=10)
    ax1.set_xlabel("along the mean of the methods' vectors (z=0: untrained)")
    ax1.set_ylabel(f"across ({grid['axes'][1]} - {grid['axes'][0]}, orthogonalized)")
    for p in result["paths"]:
        for method, values in p["metric"].items():
            ax2.plot(p["lambdas"], values, marker="o", label=f"{p['from']}->{p['to']} via {method}")
    ax2.set_xlabel("interpolation weight")
    ax2.set_ylabel("metric")
    ax2.set_title("linear paths between methods' vectors")
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic.write_file(path_png, buffer.getvalue())  # a kill mid-write leaves the old figure, not half a PNG
