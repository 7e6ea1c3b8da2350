"""Evaluating a flat solution vector through a method, differentiably.

`Bank` keeps ONE backbone carrying a delta of every method (prefixes finalized, so each delta is
exactly the tensors its flat layout describes) and runs the model with `torch.func.functional_call`:
the delta's parameter names are mapped to slices of the vector and the task head's to the task's
head tensors. Nothing is copied into the model, so the loss is a function of the vector and
gradients flow back into whatever produced it (an up-projection, a d-dimensional vector).
The model runs in eval mode (no dropout): every stage sees the same deterministic function.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..core.delta import DeltaConfig
from ..core.model import DeltaModel
from ..data.metrics import compute_metrics
from ..data.tasks import Example, Task
from ..train.objectives import ClassifierObjective, has_lm_head
from .flatten import Layout, unflatten

Head = Mapping[str, torch.Tensor]


class Bank:
    """A backbone with one (inactive) delta per method; `loss`/`evaluate` run a vector through one of them."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, configs: Mapping[str, DeltaConfig], max_length: int = 64):
        if has_lm_head(backbone):
            raise ValueError("the subspace study needs a sequence-classification backbone (e.g. minilm-l6)")
        self.dm = DeltaModel(backbone)
        for method, config in configs.items():
            # attached switched off: `logits` enables one at a time, so methods that claim the same weights
            # (BitFit and diff pruning both reparametrize the biases) share the bank as they shared nothing
            # while each was collected on its own
            self.dm.add(method, config, enabled=False)
            self.dm.delta(method).finalize()
        self.dm.eval()
        for p in self.dm.parameters():
            p.requires_grad_(False)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.layouts = {m: Layout.of(self.dm.delta_state_dict(m)) for m in configs}
        self.head_names = self.dm.head_parameter_names()

    @property
    def methods(self) -> list[str]:
        return list(self.layouts)

    def _params(self, method: str, vector: torch.Tensor, head: Head) -> dict[str, torch.Tensor]:
        if method not in self.layouts:
            raise KeyError(f"no method {method!r} in this bank; it has {', '.join(self.layouts)}")
        params = {f"deltas.{method}.{n}": t for n, t in unflatten(vector, self.layouts[method]).items()}
        missing = [n for n in self.head_names if n not in head]
        if missing:
            raise ValueError(f"the task head lacks {missing}; heads come from `deltatune subspace collect`")
        params.update({f"backbone.{n}": head[n] for n in self.head_names})
        return params

    def logits(self, method: str, vector: torch.Tensor, head: Head, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.dm.set_active(method)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return functional_call(self.dm, self._params(method, vector, head), args=(), kwargs=inputs).logits

    def loss(self, method: str, vector: torch.Tensor, head: Head, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = self.logits(method, vector, head, batch).float()
        labels = batch["labels"]
        if labels.is_floating_point():
            return F.mse_loss(logits[:, 0], labels)
        return F.cross_entropy(logits, labels)

    def collate(self, task: Task, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return ClassifierObjective(task, self.tokenizer, self.max_length).collate(examples)

    @torch.no_grad()
    def evaluate(
        self,
        method: str,
        vector: torch.Tensor,
        head: Head,
        task: Task,
        examples: Sequence[Example],
        batch_size: int = 64,
    ) -> dict[str, float]:
        predictions: list = []
        for i in range(0, len(examples), batch_size):
            batch = self.collate(task, examples[i : i + batch_size])
            logits = self.logits(method, vector, head, batch).float()
            predictions += logits[:, 0].tolist() if task.type == "regression" else logits.argmax(-1).tolist()
        return compute_metrics(task, predictions, list(examples))


def batches(
    bank: Bank, task: Task, examples: Sequence[Example], batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled training batches forever (a new order each pass), reproducible from `seed`."""
    if not examples:
        raise ValueError(f"task {task.name!r} has no training examples")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            yield bank.collate(task, [examples[j] for j in order[i : i + batch_size]])
