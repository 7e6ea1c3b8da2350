"""Per-row routing: one batched forward in which each row uses its own deltas.

Serving many deltas of one backbone means batching requests that want different deltas. A
`Route` tells a delta which rows of the current batch are its own. The hooks in `core.delta`
then run the delta's function on those rows only (gathered with `index_select`) and scatter the
result back (`index_copy`, out of place, so autograd still works), while the other rows pass
through untouched. Reparametrized parameters cannot differ per row, so a module whose weights a
delta reparametrizes is recomputed for that delta's rows with the delta's weights.

Rows are expanded automatically when generation widens the batch (beam search,
`num_return_sequences`): row i becomes rows i*k ... i*k+k-1, as `repeat_interleave` lays them.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

SHARED_ROWS = "_deltatune_shared_rows"  # a module every row of a batch shares (compat.SHARED_BY_ROWS): its name


def mark_shared(module: nn.Module, name: str) -> None:
    """Mark `module` (named `name`) when every row of a batch shares it, so that routing refuses it."""
    from .compat import shared_by_rows

    if shared_by_rows(name):
        setattr(module, SHARED_ROWS, name)


def shared_rows_error(module: nn.Module) -> RoutingError:
    params = ", ".join(getattr(module, "parametrizations", {})) or "output"
    what = getattr(module, SHARED_ROWS, None) or f"{type(module).__name__.removeprefix('Parametrized')}.{params}"
    return RoutingError(
        f"a delta changes {what}, which is computed once for every row of the batch (positions, a relative "
        "position table): it cannot serve only some rows; serve its rows in a batch of their own (set_active), "
        "or leave that module out of its targets"
    )


class RoutingError(RuntimeError):
    """A mixed batch that cannot be served as asked (unknown name, merged delta, unroutable method...)."""


@dataclasses.dataclass
class Route:
    """The rows of a batch of `batch` rows that one delta acts on."""

    rows: torch.Tensor  # sorted long indices
    batch: int

    @property
    def empty(self) -> bool:
        return self.rows.numel() == 0

    @property
    def full(self) -> bool:
        return self.rows.numel() == self.batch

    def index(self, size: int, module: nn.Module | None = None) -> torch.Tensor:
        """The delta's rows in a tensor of `size` rows (the routed batch, possibly widened by generation) that
        `module` is called with; a module every row shares has no rows of its own (`mark_shared`)."""
        if module is not None and getattr(module, SHARED_ROWS, None):
            raise shared_rows_error(module)
        if size == self.batch:
            return self.rows
        if size % self.batch == 0:
            k = size // self.batch
            return (self.rows.unsqueeze(1) * k + torch.arange(k, device=self.rows.device)).flatten()
        raise RoutingError(  # delta_ids were checked against the batch: this module is not called per row
            f"a tensor with {size} rows reached a delta routed over a batch of {self.batch}: that module is computed "
            "once for every row of the batch (positions, a relative position table), so a delta on it cannot serve "
            "only some rows; serve its rows in a batch of their own (set_active), or leave it out of its targets"
        )


RowIds = Sequence[str | Sequence[str] | None]


def row_names(delta_ids: RowIds, batch: int | None = None) -> list[tuple[str, ...]]:
    """Normalise each row's id to a tuple of delta names (None: the bare backbone).

    `delta_ids` itself must be a list or tuple: a string would otherwise be read one character per row.
    `batch`, when known, is the number of rows it must have.
    """
    if not isinstance(delta_ids, list | tuple):
        raise RoutingError(
            f"delta_ids must be a list with one entry per row (a name, a list of names, or None), got "
            f"{type(delta_ids).__name__} {delta_ids!r:.60}; e.g. delta_ids=['a', 'b', None]"
        )
    rows = []
    for i, entry in enumerate(delta_ids):
        if entry is None:
            rows.append(())
        elif isinstance(entry, str):
            rows.append((entry,))
        elif isinstance(entry, list | tuple) and all(isinstance(n, str) for n in entry):
            if len(set(entry)) != len(entry):
                raise RoutingError(f"delta_ids[{i}] names a delta twice ({list(entry)}); name each delta once per row")
            rows.append(tuple(entry))
        else:
            raise RoutingError(f"delta_ids[{i}] must be a delta name, a list of names or None, got {entry!r}")
    if not rows:
        raise RoutingError("delta_ids is empty; pass one entry per row of the batch")
    if batch is not None and len(rows) != batch:
        raise RoutingError(f"delta_ids has {len(rows)} entries for a batch of {batch} rows; pass one delta id per row")
    return rows


PEFT_BASE = "__base__"  # PEFT's name for "no adapter on this row"
_OURS = ("delta_ids", "adapter_names")
_PASSED: set[str] = {"adapter_names"}  # keywords seen and let through (checked once each)


def peft_rows(delta_ids: RowIds | None, kwargs: dict) -> RowIds | None:
    """PEFT's mixed-batch keyword, `adapter_names=["a", "__base__"]`, read as `delta_ids=["a", None]` (taken out of
    `kwargs`). Passed on, it was dropped unseen: transformers models take unknown keywords (**kwargs), so every
    row ran with every enabled delta, and only generate() said a word."""
    for key in kwargs.keys() - _PASSED:  # a misspelt delta_ids: the model would drop it unseen (its **kwargs)
        close = difflib.get_close_matches(key, _OURS, n=1, cutoff=0.75)
        if key != "adapter_names" and (key.lower().startswith("delta") or close):
            raise RoutingError(
                f"unknown keyword {key!r}; did you mean {(close or _OURS)[0]}? (the model would ignore it unseen)"
            )
        _PASSED.add(key)
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return delta_ids
    if delta_ids is not None:
        raise RoutingError("give delta_ids or PEFT's adapter_names, not both (they say the same: one entry per row)")
    if not isinstance(names, list | tuple):
        raise RoutingError(f"adapter_names must be a list with one name per row, got {type(names).__name__}")
    return [None if n == PEFT_BASE else n for n in names]


def input_rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call (input_ids or inputs_embeds, else the first tensor argument)."""
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def refuse_recomputation(model: torch.nn.Module) -> None:
    """Refuse a mixed batch that would train with gradient (activation) checkpointing on.

    Checkpointed layers run their forward again during backward, after `DeltaModel.route` has ended:
    every delta's hooks then act on every row (reentrant checkpointing: other rows' gradients, no error;
    non-reentrant: a bare CheckpointError). Inference (eval mode or no grad) checkpoints nothing.
    """
    if not (model.training and torch.is_grad_enabled()):
        return
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        # transformers 5.25 renamed it activation checkpointing (the old name warns until v6)
        off = "activation" if callable(getattr(model, "activation_checkpointing_disable", None)) else "gradient"
        raise RoutingError(
            "a mixed batch (delta_ids) cannot train with gradient checkpointing on: the checkpointed layers run again "
            "during backward, after the routing has ended, so each enabled delta would act on every row and the "
            f"gradients would be other rows'; turn it off (model.{off}_checkpointing_disable()) to train routed "
            "batches, or train each delta on batches of its own"
        )


def routes_for(rows: list[tuple[str, ...]], names: Sequence[str], device: torch.device) -> dict[str, Route]:
    """One `Route` per attached delta, from the per-row names."""
    batch = len(rows)
    by_name: dict[str, list[int]] = {n: [] for n in names}
    for i, row in enumerate(rows):
        for n in row:
            by_name[n].append(i)
    return {n: Route(torch.tensor(idx, dtype=torch.long, device=device), batch) for n, idx in by_name.items()}


# -- gathering and scattering rows --------------------------------------------------------------
def _take(value: Any, idx: torch.Tensor, size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == size:
        return value.index_select(0, idx)
    if isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(_take(v, idx, size) for v in value)  # e.g. Llama's (cos, sin) position embeddings
    return value


def take_rows(args: tuple, kwargs: dict, idx: torch.Tensor, size: int) -> tuple[tuple, dict]:
    """Every batch-leading tensor of a call, restricted to the rows `idx`."""
    return tuple(_take(a, idx, size) for a in args), {k: _take(v, idx, size) for k, v in kwargs.items()}


def _put(full: Any, sub_before: Any, sub_after: Any, idx: torch.Tensor, what: str) -> Any:
    if sub_after is sub_before:
        return full
    if isinstance(full, torch.Tensor) and isinstance(sub_after, torch.Tensor) and full is not sub_before:
        if sub_after.shape[1:] != full.shape[1:]:
            raise RoutingError(
                f"{what} changes the shape of its input from {tuple(full.shape[1:])} to {tuple(sub_after.shape[1:])} "
                "per row, so it cannot serve only some rows of a batch; give every row a delta of this kind"
            )
        return full.index_copy(0, idx, sub_after.to(full.dtype))  # never in place: the caller holds inputs
    return sub_after  # not batch-shaped: row-independent, take the delta's value


def batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    raise RoutingError("cannot find a batched tensor in this module's inputs to route rows by")


def needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors (then rows must not be written in place)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def scatter_rows(full: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """A module output with `rows` written at `idx`.

    In place when no graph needs the old values (serving) and the output is fresh memory, not one of
    the module's inputs passed through (an eval-mode dropout returns its input, the residual stream);
    otherwise out of place. Under torch.compile always out of place: dynamo cannot read storage pointers
    (each check broke the graph) and the compiled graph reuses memory by itself.
    """
    rows = rows.to(full.dtype)
    if torch.compiler.is_compiling():
        return full.index_copy(0, idx, rows)
    storage = full.untyped_storage().data_ptr()
    aliased = any(
        isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == storage for v in (*args, *kwargs.values())
    )
    if aliased or needs_graph(full, rows):
        return full.index_copy(0, idx, rows)
    return full.index_copy_(0, idx, rows)


def hidden_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RoutingError(f"cannot route rows through a module returning {type(output).__name__}")


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def routed_output(
    fn: Callable[[Any, tuple, dict, Any], Any], route: Route, module: Any, args: tuple, kwargs: dict, output: Any
) -> Any:
    """Apply an output hook to the route's rows only."""
    hidden = hidden_of(output)
    size = hidden.shape[0]
    idx = route.index(size, module)
    sub_args, sub_kwargs = take_rows(args, kwargs, idx, size)
    sub_out = (
        output.index_select(0, idx)
        if isinstance(output, torch.Tensor)
        else (tuple(_take(o, idx, size) for o in output))
    )
    new = fn(module, sub_args, sub_kwargs, sub_out)
    if new is None:
        return None
    new_hidden = hidden_of(new)
    if new_hidden.shape[1:] != hidden.shape[1:]:
        raise RoutingError(f"{type(module).__name__}'s delta changes its output shape; it cannot serve only some rows")
    return with_hidden(output, scatter_rows(hidden, idx, new_hidden, args, kwargs))


def routed_input(
    fn: Callable[[Any, tuple, dict], Any], route: Route, module: Any, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Apply an input pre-hook to the route's rows only."""
    size = batch_size(args, kwargs)
    idx = route.index(size, module)
    sub_args, sub_kwargs = take_rows(args, kwargs, idx, size)
    result = fn(module, sub_args, sub_kwargs)
    if result is None:
        return None
    new_args, new_kwargs = result
    what = f"a delta on {type(module).__name__}"
    args_out = tuple(_put(f, s, n, idx, what) for f, s, n in zip(args, sub_args, new_args, strict=True))
    kwargs_out = dict(kwargs)
    for key, value in new_kwargs.items():
        kwargs_out[key] = _put(kwargs[key], sub_kwargs[key], value, idx, what) if key in kwargs else value
    return args_out, kwargs_out


def recompute_rows(delta: Any, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """In a mixed batch, `module` recomputed for `delta`'s rows with the delta's reparametrized weights.

    Only a module called with one input row per batch row can serve some rows: T5's relative position
    table is called with (queries, keys) buckets, and a position table with (1, length) ids, once for
    every row. Recomputing them "for some rows" replaced query positions (logits 0.2 off, no error, where
    the length was a multiple of the batch) or failed on a size; each is refused in one line.
    """
    route = delta.route
    if route is None or route.empty or route.full:
        return None
    size = batch_size(args, kwargs)
    if size % route.batch or hidden_of(output).shape[0] != size:
        raise shared_rows_error(module)
    idx = route.index(size, module)
    sub_args, sub_kwargs = take_rows(args, kwargs, idx, size)
    delta.recomputing = True
    try:
        new = module.forward(*sub_args, **sub_kwargs)  # .forward: no hooks, so nothing runs twice
    finally:
        delta.recomputing = False
    return with_hidden(output, scatter_rows(hidden_of(output), idx, hidden_of(new), args, kwargs))
