"""Who a backbone is: the identity a saved delta carries, so it is never applied to another model.

A delta is meaningful only on the weights it was trained on. The identity is a structural hash
(parameter names and shapes), the dtypes, and one signature per parameter: sign-weighted sums of a
fixed strided sample of its values. Every tensor is covered, so re-randomizing any of them is
noticed; the sums are compared with a tolerance, so a bf16 or fp16 copy of the same model still
matches (an exact hash could not: rounding differs value by value). A quantized weight (bitsandbytes' 4-bit
and 8-bit layers: QLoRA) counts by its logical shape and carries no signature: 4-bit rounding moves a
signature as far as re-drawing the tensor does. Its model's other tensors (embeddings, norms, biases) are
still compared, so a delta trained on a quantized model loads onto the same model unquantized (to merge it
there), and not onto another checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import torch
import transformers
from torch import nn

from .layers import is_quantized, logical_shape
from .targeting import head_names, plain_name

_SLICE = 8  # values kept from each of three probe tensors (the identity files written before signatures hold)
_SAMPLE = 256  # values read from every parameter for its signature
_RTOL = 6e-3  # bf16 keeps 8 significant bits: a copy moves each value by at most 2^-8 of itself


class IdentityError(ValueError):
    """The model is not the backbone a delta was trained on (raised as DeltaIOError by io)."""


def base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The backbone's parameters without its task head: a head is per task, often freshly initialised."""
    heads = tuple(f"{h}." for h in head_names(model))
    return sorted((plain_name(n), p) for n, p in model.named_parameters() if not (heads and n.startswith(heads)))


@functools.lru_cache(maxsize=256)
def _positions(numel: int, count: int) -> torch.Tensor:
    count = min(count, numel)
    return torch.arange(count, dtype=torch.int64) * (numel - 1) // max(count - 1, 1)


def probe_index(numel: int, count: int) -> torch.Tensor:
    """`count` evenly spread positions in a tensor, in integers (float steps overflow past 2^24)."""
    return _positions(numel, count).clone()


def _signs(n: int, k: int) -> torch.Tensor:
    """The k-th fixed +-1 pattern over n positions (an integer hash: the same on every machine and version)."""
    h = (torch.arange(n, dtype=torch.int64) * 1103515245 + 12345 * (k + 1)) % 2147483648
    return ((h >> 16) & 1).double() * 2 - 1


@functools.lru_cache(maxsize=64)
def _patterns(n: int) -> torch.Tensor:
    """Both sign patterns over n positions as one (n, 2) matrix: one product gives both sums."""
    return torch.stack([_signs(n, 0), _signs(n, 1)], dim=1)


def signatures(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Each tensor's two sign-weighted sums and sum of magnitudes of a fixed strided sample.

    Independent sign patterns: a re-drawn tensor escapes both only with odds ~1e-3 per tensor.
    Tensors with samples of one length are summed together (one product per length), which keeps
    saving and loading a delta cheap: this runs over every backbone parameter on each of them.
    """
    samples = [t.detach().reshape(-1)[_positions(t.numel(), _SAMPLE).to(t.device)] for t in tensors]
    out: list[list[float]] = [[] for _ in tensors]
    by_len: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        by_len.setdefault(sample.numel(), []).append(i)
    for n, rows in by_len.items():
        values = torch.stack([samples[i].to("cpu", torch.float64) for i in rows])
        sums = (values @ _patterns(n)).tolist()
        mags = values.abs().sum(dim=1).tolist()
        for i, pair, mag in zip(rows, sums, mags, strict=True):
            out[i] = [*pair, mag]
    return out


def signature(p: torch.Tensor) -> list[float]:
    """One tensor's signature (see `signatures`)."""
    return signatures([p])[0]


def merged_names(model: nn.Module) -> set[str]:
    """The parameters that deltas merged into this model have changed (by plain name): they are the base weights
    plus a delta, so they say nothing of which checkpoint the model is. Saving one delta while another was merged
    recorded them, and the right model was then refused as "another checkpoint"."""
    from .marks import owner
    from .merge import merged_tensors

    dm = owner(model)
    return merged_tensors(dm) if dm is not None and dm.backbone is model else set()


def _structure(params: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, p in params:
        digest.update(f"{name}:{tuple(logical_shape(p))};".encode())
    return digest.hexdigest()


def fingerprint(model: nn.Module, params: list[tuple[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Structure hash, dtypes, a per-parameter signature and (for older readers) a few probe values."""
    params = base_parameters(model) if params is None else params
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in params})
    probes = {}
    for name, p in (params[0], params[len(params) // 2], params[-1]) if params else ():
        flat = p.detach().reshape(-1)
        probes[name] = [float(v) for v in flat[probe_index(flat.numel(), _SLICE).to(flat.device)].float().cpu()]
    config = getattr(model, "config", None)
    merged = merged_names(model)
    unsigned = [is_quantized(p) or name in merged for name, p in params]
    sigs = iter(signatures([p for (_, p), skip in zip(params, unsigned, strict=True) if not skip]))
    return {
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None),
        "class": type(model).__name__,
        "num_parameters": sum(logical_shape(p).numel() for _, p in params),
        "structure_sha256": _structure(params),
        "transformers": transformers.__version__,  # releases rename modules (ViT, DINOv2 from 4.x to 5.x)
        "dtypes": dtypes,
        "probes": probes,
        # one [sum, sum, magnitude] triple per parameter (None: quantized, or changed by a merged delta), in the
        # structure hash's sorted order
        "signatures": [None if skip else [float(f"{v:.4g}") for v in next(sigs)] for skip in unsigned],
    }


def describe(fp: dict[str, Any]) -> str:
    name = fp.get("name_or_path") or "unnamed"
    count = fp.get("num_parameters", 0)
    count = f"{count:,}" if isinstance(count, int) else "?"
    return f"{fp.get('class')} ({fp.get('model_type')}, {name}, {count} parameters)"


def check(saved: dict[str, Any], model: nn.Module) -> None:
    """Refuse a delta made for another backbone, naming both; dtype differences are fine (cast on load).

    Every save records the backbone, so none recorded (loaders pass {} for a missing key) is an edited file;
    comparing it anyway named a model "None (None, unnamed, 0 parameters)"."""
    if saved is None or saved == {}:
        raise IdentityError(
            "delta.json has no 'backbone' record (was delta.json edited?), so it cannot be checked against this "
            "model; save the delta again"
        )
    if not isinstance(saved, dict):
        raise IdentityError("delta.json's backbone identity is not a mapping; was the JSON edited?")
    params = base_parameters(model)
    if saved.get("structure_sha256") != _structure(params):
        here = fingerprint(model, params)
        release = saved.get("transformers")
        same = (saved.get("class"), saved.get("num_parameters")) == (here["class"], here["num_parameters"])
        if same and release not in (None, here["transformers"]):
            raise IdentityError(
                f"this delta was trained on {describe(saved)} under transformers {release}; this transformers "
                f"({transformers.__version__}) names the same {here['num_parameters']:,} parameters otherwise: "
                f"{here['class']}'s modules were renamed between releases (ViT's and DINOv2's from 4.x to 5.x). Load it "
                "with the transformers it was saved with"
            )
        raise IdentityError(
            f"this delta was trained on {describe(saved)} but the model is {describe(fingerprint(model, params))}: "
            "their parameter names or shapes differ; load it onto the backbone it was trained on"
        )
    other = (
        f"this delta was trained on {describe(saved)}; the model has the same shapes but other weights "
        "(e.g. {name!r} differs): it is another checkpoint of the same architecture; load the right one"
    )
    recorded = saved.get("signatures")
    if recorded is not None:
        if not isinstance(recorded, list) or len(recorded) != len(params):
            raise IdentityError("delta.json's backbone signatures do not fit the model's parameters; was it edited?")
        for pair in recorded:
            if pair is not None and not (
                isinstance(pair, list) and len(pair) == 3 and all(isinstance(v, int | float) for v in pair)
            ):
                raise IdentityError("delta.json's backbone signatures are malformed; was the JSON edited?")
        compared = [(name, p, pair) for (name, p), pair in zip(params, recorded, strict=True)]
        merged = merged_names(model)
        compared = [
            (n, p, pair) for n, p, pair in compared if pair is not None and not is_quantized(p) and n not in merged
        ]
        here = signatures([p for _, p, _ in compared])
        for (name, _, pair), (*sums, mag) in zip(compared, here, strict=True):
            tol = _RTOL * max(mag, abs(pair[2])) + 1e-6
            if any(abs(a - b) > tol for a, b in zip(sums, pair[:2], strict=True)) or abs(mag - pair[2]) > tol:
                raise IdentityError(other.format(name=name))
        return
    by_name = dict(params)  # a file written before signatures: its few probe values
    probes = saved.get("probes", {})
    for name, values in probes.items() if isinstance(probes, dict) else ():
        if name not in by_name:
            raise IdentityError(
                f"delta.json names a backbone parameter {name!r} this model lacks; was the JSON edited?"
            )
        flat = by_name[name].detach().reshape(-1).float().cpu()
        if (
            not isinstance(values, list)
            or len(values) > flat.numel()
            or not torch.allclose(
                flat[probe_index(flat.numel(), len(values))],
                torch.tensor(values, dtype=torch.float32),
                rtol=2e-2,
                atol=1e-3,
            )
        ):
            raise IdentityError(other.format(name=name))
