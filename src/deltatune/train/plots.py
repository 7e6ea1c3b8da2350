"""Learning curves as PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], metric: str, path: str | Path, title: str = ""
) -> Path:
    """One line per run: `metric` on dev against optimizer steps, with the train loss in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in curves.items():
        steps = [row["step"] for row in history]
        left.plot(steps, [row[metric] for row in history], marker="o", label=label)
        right.plot(steps, [row["train_loss"] for row in history], marker=".", label=label)
    left.set(xlabel="optimizer step", ylabel=f"dev {metric}", title=title or f"dev {metric}")
    right.set(xlabel="optimizer step", ylabel="train loss", title="train loss (mean since last eval)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
