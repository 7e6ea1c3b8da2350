"""Tokens in front of the input (prompt tuning): how a stack numbers positions and token types around them.

Prompt vectors go in front of the input embeddings (methods/addition/prompt.py). A stack that numbers positions
by the input's length, counts from a padding index (RoBERTa), or fills token types from a buffer as long as
its position table (BERT 4.57) must count the prompt's rows or skip them, as the method's `positions` says.
Like `compat.py`, this module is where those transformers internals are named.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import compat_rows
from .compat import CallArgs, signature

# flash attention's bounds of the sequences packed in a row (DataCollatorWithFlattening(return_flash_attn_kwargs=True))
PACKED_BOUNDS = ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")


def refuse_packed(call: CallArgs, kwargs: dict[str, Any], mask: torch.Tensor | None) -> None:
    """Rows that pack several sequences (DataCollatorWithFlattening; TRL's packing or padding_free) are refused.

    transformers keeps packed sequences apart by their position_ids, which restart where a sequence starts,
    when no mask is given (or by flash attention's bounds). A prompt sits once at the row's start: with it, every
    sequence after the first attended to the ones packed before it (logits 0.1 off, no error). Padded rows, and
    prefix tuning, which puts its keys in every attention without adding positions, keep them apart.
    """
    positions = call.get("position_ids") if call.accepts("position_ids") else None
    restarts = mask is None and torch.is_tensor(positions) and bool((positions.diff(dim=-1) != 1).any())
    if restarts or any(kwargs.get(k) is not None for k in PACKED_BOUNDS):
        raise ValueError(
            "prompt tuning on packed rows (position_ids that restart within a row and no attention mask, as "
            "DataCollatorWithFlattening and TRL's packing=True or padding_free=True give): the prompt is prepended "
            "once per row, so each sequence would attend to those packed before it; pad the batch instead "
            "(TRL: packing=False), or use prefix tuning, which keeps packed sequences apart"
        )


def shape_numbered_positions(stack: nn.Module, n: int) -> list[tuple[nn.Module, Any]]:
    """Where a stack takes no position_ids but numbers positions by the input's length: the (module,
    pre-hook) pairs that give `n` leading (prompt) positions 0 and the real tokens 0, 1, ...

    BART's learned position table takes position_ids itself. DistilBERT 4.x slices a buffer of
    max_position_embeddings by length (a long prompt overflows it) and feeds it to its position
    nn.Embedding: one hook reads the real length off the embeddings' input, one rewrites the ids.
    """
    if "position_ids" in signature(stack).parameters:
        return []

    def numbered(total: int, device: torch.device) -> torch.Tensor:
        return torch.cat([torch.zeros(n, dtype=torch.long), torch.arange(total - n)]).to(device)

    positions = getattr(stack, "embed_positions", None)
    if positions is not None and "position_ids" in signature(positions).parameters:

        def by_keyword(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            shaped = args[0] if args else next(iter(kwargs.values()))  # ids, or their torch.Size (Marian, Pegasus)
            if isinstance(shaped, torch.Size):
                return args, {**kwargs, "position_ids": numbered(shaped[1], module.weight.device)}
            return args, {**kwargs, "position_ids": numbered(shaped.shape[1], shaped.device)}

        return [(positions, by_keyword)]
    embeddings = getattr(stack, "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return []
    seen: dict[str, int] = {}

    def length(module: nn.Module, args: tuple, kwargs: dict) -> None:
        shaped = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)][-1]  # embeds if given
        seen["total"] = shaped.shape[1]

    def by_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = args[0]
        return (numbered(seen["total"], ids.device).expand(len(ids), -1), *args[1:]), kwargs

    return [(embeddings, length), (table, by_input)]


def real_positions(
    stack: nn.Module, ids: torch.Tensor | None, embeds: torch.Tensor, given: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """The real tokens' positions as the stack numbers them, and the first position (where prompts sit).

    RoBERTa-style embeddings (a position table with a padding row) count from padding_idx + 1 and
    skip padding; computed here from that definition, since the helper moved between releases.
    """
    table = getattr(getattr(stack, "embeddings", None), "position_embeddings", None)
    padding_idx = getattr(table, "padding_idx", None) if isinstance(table, nn.Embedding) else None
    if padding_idx is not None:
        first = padding_idx + 1
        if given is not None:
            return given, first
        if ids is not None:
            real = ids.ne(padding_idx).long()
            return torch.cumsum(real, dim=1) * real + padding_idx, first
        return torch.arange(first, first + embeds.shape[1], device=embeds.device).unsqueeze(0), first
    if given is not None:
        return given, 0
    return torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0), 0


def token_types_with_prefix(
    stack: nn.Module, call: CallArgs, n: int, batch: int, length: int, device: torch.device
) -> None:
    """Give the call `n` leading type-0 token types; where none came, the zeros the stack's buffer stands for.

    BERT fills missing token_type_ids from a zeros buffer as long as its position table, which 4.57
    slices by sequence length, so a long prompt overflows it; passing the zeros is the same input.
    (GPT-2 also takes token_type_ids but adds their word embeddings: it gets none where none came.)
    """
    if not call.accepts("token_type_ids"):
        return
    given = call.get("token_type_ids")
    if given is None:
        if isinstance(getattr(getattr(stack, "embeddings", None), "token_type_ids", None), torch.Tensor):
            call.set("token_type_ids", torch.zeros(batch, n + length, dtype=torch.long, device=device))
    else:
        call.set("token_type_ids", torch.cat([given.new_zeros(batch, n), given.expand(batch, -1)], dim=1))


# Per-token flags a stack takes beside attention_mask, and the value the prompt's rows get: Longformer's (and
# LED's) global attention, which its classifier sets on the first token from the input ids (the prompt's rows
# attend locally, as any token; the first real token keeps its global attention)
ROW_FLAGS = {"global_attention_mask": 0}


def row_flags_with_prefix(call: CallArgs, n: int, batch: int) -> None:
    """Give per-token flags `n` leading rows of their value. Longformer's classifier failed on a size ("The size
    of tensor a (11) must match the size of tensor b (8)") where its global mask missed the prompt's rows."""
    for keyword, value in ROW_FLAGS.items():
        given = call.get(keyword) if call.accepts(keyword) else None
        if isinstance(given, torch.Tensor) and given.dim() == 2:
            ahead = torch.full((batch, n), value, dtype=given.dtype, device=given.device)
            call.set(keyword, torch.cat([ahead, given.expand(batch, -1)], dim=1))


def length_numbered_limit(stack: nn.Module) -> int | None:
    """Rows a position table deeper in the stack numbers by the whole sequence's length (RoFormer's rotary table,
    in its encoder, takes the hidden states' shape): a prompt's rows count there, and past its size transformers
    failed with "IndexError: index out of range in self". The stack's own `embed_positions` (Marian, Pegasus) is
    renumbered by `shape_numbered_positions` instead, and does not count."""
    own = getattr(stack, "embed_positions", None)
    sizes = [
        m.num_embeddings
        for m in stack.modules()
        if m is not own
        and isinstance(m, nn.Embedding)
        and next(iter(signature(m).parameters), None) in ("input_ids_shape", "input_shape")
    ]
    return min(sizes) if sizes else None


def rows_limit(stack: nn.Module, model: nn.Module) -> tuple[int | None, str]:
    """How many rows, a prompt's included, the stack can take, and what bounds them: a fixed causal buffer (GPT-Neo,
    `compat_rows.tokens_limit`) or a position table numbered by the whole sequence (`length_numbered_limit`)."""
    buffer, table = compat_rows.tokens_limit(stack, model), length_numbered_limit(stack)
    if table is not None and (buffer is None or table < buffer):
        return table, "position table numbers"
    return buffer, "causal mask covers"
