"""PEFT LoRA initialisations that change the base model, read back exactly.

PiSSA and OLoRA start LoRA from a factorisation of the base weight (B0 A0: PiSSA its top-r singular
directions, OLoRA the first r columns of its QR) and subtract that product from the base weight, so the
model that was trained is `W - s B0 A0 + s B A`. A folder saved without PEFT's conversion
(`save_pretrained(..., path_initial_model_for_weight_conversion=...)`) holds the trained B, A only and
says `init_lora_weights: "pissa"`; PEFT recomputes B0 A0 from the base when it loads it. Read as a
plain LoRA it would be off by `s B0 A0`: outputs wrong, no error (measured: 0.011 on tiny BERT's
hidden states against PEFT's reload). Here the same product is recomputed from the base weight and
appended as r more rank-one terms with the opposite sign, so the import is one ordinary LoRA of rank
2r whose output equals PEFT's.

Inits whose offset cannot be recomputed from the base (CorDA and Astra need activation statistics, LoftQ a
quantizer) are refused with the conversion that makes a plain LoRA of them; LoRA-GA's offset needs
the training gradients, which PEFT's own reload also lacks, so it loads as PEFT loads it, with a
warning that its outputs are those of the trained model only on the base saved with it.
"""

from __future__ import annotations

import warnings

import torch

from .peft_common import PeftFormatError

# leave the base weight as it is: the trained model is W + s B A, the plain reading
_PLAIN = {"gaussian", "eva", "orthogonal", "mica", "nora"}  # nora: A's columns normalised at init (PEFT 0.22)
_CONVERT = "save it from PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=DIR) (a plain LoRA)"


def residual_kind(config: dict, ignore_fields: tuple[str, ...] = ()) -> str | None:
    """'pissa', 'olora' or None (plain LoRA) for a LoRA config's `init_lora_weights`; refuses the rest."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, bool) or init in _PLAIN or "init_lora_weights" in ignore_fields:
        return None
    if init == "pissa":
        kind = "pissa"
    elif isinstance(init, str) and init.startswith("pissa_niter_"):
        warnings.warn(
            f"init_lora_weights={init!r} subtracted a randomized SVD from the base weights when it was trained, a draw "
            "no reload repeats (PEFT's neither); imported with the exact SVD it approximates, so the outputs are close, "
            f"not equal; for an exact adapter {_CONVERT}",
            stacklevel=3,
        )
        kind = "pissa"
    elif init == "olora":
        kind = "olora"
    elif init == "lora_ga":
        warnings.warn(
            "this adapter was trained with init_lora_weights='lora_ga', which offsets the base weights by an amount "
            "that needs the training gradients; like PEFT's reload it loads as a plain LoRA, whose outputs are the "
            "trained model's only on the base saved with it",
            stacklevel=3,
        )
        return None
    elif init in ("corda", "astra"):  # astra (PEFT 0.22): W - s B0 A0, B0 eigenvectors of the output activations
        raise PeftFormatError(
            f"this adapter was trained with init_lora_weights={init!r}, which changed the base weights using activation "
            f"statistics deltatune cannot recompute; {_CONVERT}"
        )
    elif init == "loftq":
        raise PeftFormatError(
            "this adapter was trained with init_lora_weights='loftq' on a quantized copy of the base that deltatune "
            "does not recompute; load the LoftQ base saved with it as the model and pass "
            "ignore_fields=['init_lora_weights']"
        )
    else:
        raise PeftFormatError(
            f"adapter_config.json sets init_lora_weights={init!r}, unknown to deltatune's LoRA import, and it may have "
            f"changed the base weights; {_CONVERT}, or pass ignore_fields=['init_lora_weights'] if it did not"
        )
    if config.get("use_dora"):
        raise PeftFormatError(f"DoRA with init_lora_weights={init!r} cannot be imported; {_CONVERT}")
    return kind


@torch.no_grad()
def initial_offset(
    weight: torch.Tensor, kind: str, r: int, scale: float, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with P @ Q the (out, in) product PEFT's init subtracted from `weight` (scale s = alpha / r).

    PiSSA uses the exact SVD also for `pissa_niter_N`, the limit of the randomized one PEFT redraws on
    every load (measured on tiny BERT, niter 4: PEFT's reload 7.9e-3 from the trained model, this 3.1e-3)."""
    w = weight.detach().float()
    if transposed:  # GPT-2's Conv1D stores (in, out)
        w = w.t()
    if kind == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r] * s[:r], vh[:r]  # PEFT divides S by s for B0, A0: the offset is U_r S_r V_r^T
    if transposed:
        raise PeftFormatError(f"OLoRA on a transposed (Conv1D) layer cannot be imported; {_CONVERT}")
    q, rr = torch.linalg.qr(w)  # PEFT: B0 = Q[:, :r], A0 = R[:r]; the offset is s B0 A0
    return q[:, :r] * scale, rr[:r]
