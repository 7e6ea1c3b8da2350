"""Attention masks with a prefix's key columns in front: tensors (eager, sdpa) and flex attention's BlockMask.

A prefix adds `n` keys every query may attend to. Each attention implementation gets its mask in its own
form (an additive or boolean 4-D tensor, a 2-D padding mask, none, or a `BlockMask` built from a
`mask_mod` function), and each must be extended in that form: a mask left as it was would either
fail on the longer keys or, worse, hide the prefix from some queries.
"""

from __future__ import annotations

from typing import Any

import torch


def extend_mask(
    mask: Any, n: int, hidden: torch.Tensor, past: int, causal: bool, rows: bool = False
) -> torch.Tensor | Any | None:
    """The mask with `n` always-attended key columns in front; built in full where a causal model passed none.

    `rows`: the prefix enters as `n` placeholder rows of the hidden states, so a BlockMask also gets `n`
    more queries (they attend as the first real query does; their outputs are dropped). A tensor mask's
    extra query rows are the caller's, as its shape tells them apart."""
    if _is_block_mask(mask):
        return _extend_block_mask(mask, n, rows)
    queries = hidden.shape[1]
    if mask is None:
        if not causal or queries == 1:
            return None  # every query sees every key: prefix included
        keys = torch.arange(past + queries, device=hidden.device)
        allowed = keys[None, :] <= torch.arange(queries, device=hidden.device)[:, None] + past
        allowed = torch.cat([allowed.new_ones(queries, n), allowed], dim=1)
        additive = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        return additive.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[None, None]
    if mask.dim() == 2:  # a (batch, keys) padding mask, 1 = attend (DistilBERT 4.x eager)
        return torch.cat([mask.new_ones(len(mask), n), mask], dim=-1)
    if mask.dim() != 4:
        raise ValueError(
            f"prefix tuning extends 4-D attention masks, but this attention got a {mask.dim()}-D one; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    pad = mask.new_ones if _one_attends(mask, rows) else mask.new_zeros
    return torch.cat([pad(*mask.shape[:-1], n), mask], dim=-1)


def _one_attends(mask: torch.Tensor, rows: bool) -> bool:
    """Whether 1 (True) means "attend" in this 4-D mask, rather than 0 in an additive one.

    Boolean and integer masks say attend with 1. DeBERTa's attention takes a 0/1 mask of the input's
    dtype (float where it made the mask itself) and attends where it is nonzero: a 0 column in front
    hid the prefix. Additive masks hold 0 and large negatives, so a floating mask of 0s and 1s with a 1
    is such a mask. Asked on the placeholder-row route only (attentions without a cache, DeBERTa's
    among them), so the cache route's float masks cost no look at their values."""
    if mask.dtype == torch.bool or not mask.is_floating_point():
        return True
    return rows and bool(((mask == 0) | (mask == 1)).all() and (mask == 1).any())


def _is_block_mask(mask: Any) -> bool:
    if mask is None or isinstance(mask, torch.Tensor):
        return False
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # a torch without flex attention passes none
        return False
    return isinstance(mask, BlockMask)


# every layer of one forward gets the same BlockMask object: it is extended once (building one evaluates
# its mask_mod over all query/key blocks), the input held so that its id cannot be reused
_last: tuple[Any, int, bool, Any] | None = None


def _extend_block_mask(mask: Any, n: int, rows: bool) -> Any:
    """A BlockMask whose key `kv` < n is always allowed and whose other keys ask the original at kv - n.

    The original `mask_mod` reads the user's padding and the causal rule by position, so it is asked
    at the positions it knows: keys (and, with `rows`, queries) shifted back by n, clamped at 0 where
    the answer is not used."""
    global _last
    last = _last  # read once: another thread may replace it between the check and the return
    if last is not None and last[0] is mask and last[1:3] == (n, rows):
        return last[3]
    from torch.nn.attention.flex_attention import create_block_mask

    inner = mask.mask_mod
    q_len, kv_len = mask.seq_lengths
    shift = n if rows else 0

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        asked = inner(b, h, (q - shift).clamp(min=0), (kv - n).clamp(min=0))
        return (kv < n) | asked

    batch, heads = mask.kv_num_blocks.shape[:2]
    out = create_block_mask(
        mask_mod,
        batch,
        heads,
        q_len + shift,
        kv_len + n,
        device=mask.kv_num_blocks.device,
        BLOCK_SIZE=mask.BLOCK_SIZE,
    )
    _last = (mask, n, rows, out)
    return out
