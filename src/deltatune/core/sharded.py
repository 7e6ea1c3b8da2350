"""A DeltaModel sharded by FSDP: what each process holds, and the calls that need the whole tensors.

Under FSDP (PyTorch's Fully Sharded Data Parallel) each process keeps a part of every parameter between
forwards and gathers the whole one inside its unit's forward. Training works unchanged (the hooks read the
deltas' parameters when they run, inside the forward), but a call made between forwards sees the parts:
FSDP2 (`fully_shard`) holds each parameter as a `DTensor`; FSDP1 (`FullyShardedDataParallel`,
use_orig_params=True) keeps the Parameter objects as flat views of this process's part. Before, FSDP1's
`save_delta` wrote the flat parts as the delta without a word and FSDP2's failed inside the identity hash;
a merge was refused as "quantized" or "tied". Now:

- saving under FSDP2 gathers: `dm.save_pretrained(path, is_main_process=rank == 0)` on every process
  (each gathers, the main one writes); called without `is_main_process`, or `save_delta`, it is refused,
  since a gather that only one process enters never ends;
- under FSDP1 saving is refused outside `FSDP.summon_full_params(model)`, where the tensors are whole;
- merging and unmerging are refused while sharded: merge on an unsharded model after training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .delta import DeltaError

if TYPE_CHECKING:
    from .model import DeltaModel

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None

SAVE_FIX = (
    "call dm.save_pretrained(path, is_main_process=<rank == 0>) on every process (each gathers the shards, "
    "the main one writes)"
)
FSDP1_SAVE_FIX = (
    "save inside `with FullyShardedDataParallel.summon_full_params(model):`, where the tensors are whole "
    "(dm.save_pretrained(path, is_main_process=<rank == 0>))"
)
MERGE_FIX = (
    "merge after training, on an unsharded model: save the delta (dm.save_pretrained(path, is_main_process=...) "
    "on every process) and merge it on a fresh backbone (DeltaModel.from_pretrained(model, path).merge())"
)


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 `DTensor` gathered from every process (a collective), anything else as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def find(dm: DeltaModel) -> tuple[str, str] | None:
    """("fsdp2" | "fsdp1", the name of a sharded tensor) when the model is sharded now, else None.

    FSDP1's flat views are told by shape: `core.replaced` records the shapes of the deltas' own tensors and of
    the backbone tensors they act on when each delta is added; inside `summon_full_params` they are whole again.
    """
    for name, p in dm.named_parameters():
        if is_dtensor(p):
            return "fsdp2", name
    for dname, delta in dm.deltas.items():
        shapes = getattr(delta, "_own_shapes", {})
        for pname, p in delta.named_parameters():
            if getattr(p, "_fsdp_flattened", False) and p.shape != shapes.get(pname, p.shape):
                return "fsdp1", f"deltas.{dname}.{pname}"
        for mname, _, _, _, params, tensors in getattr(delta, "_anchors", ()):
            for pname, _, shape in tensors:
                now = params.get(pname)
                if now is not None and getattr(now, "_fsdp_flattened", False) and now.shape != shape:
                    return "fsdp1", f"{mname}.{pname}"
    return None


def refuse_merge(dm: DeltaModel, action: str) -> None:
    """A merge writes into every process's part of a weight as if it were the whole weight."""
    if (found := find(dm)) is not None:
        raise DeltaError(f"cannot {action}: the model is sharded by FSDP ({found[1]} is a shard); {MERGE_FIX}")


def check_save(dm: DeltaModel, name: str, is_main_process: bool | None) -> str | None:
    """Refuse a save that would write a shard, or gather on one process alone; "fsdp2" when saving must gather."""
    found = find(dm)
    if found is None:
        return None
    kind, tensor = found
    if kind == "fsdp1":
        raise DeltaError(f"cannot save {name!r}: the model is sharded by FSDP ({tensor} is a shard); {FSDP1_SAVE_FIX}")
    if is_main_process is None:
        raise DeltaError(f"cannot save {name!r}: the model is sharded by FSDP ({tensor} is a DTensor); {SAVE_FIX}")
    return kind


OUTSIDE_FIX = (
    "shard the DeltaModel itself, last: fully_shard(block) per block, then fully_shard(dm) "
    "(FSDP1: FullyShardedDataParallel(dm, auto_wrap_policy=...)), after attaching every delta"
)


def check_inside(dm: DeltaModel) -> None:
    """Refuse a training forward whose backbone FSDP shards while the DeltaModel (holding the deltas) is not.

    `fully_shard(dm.backbone)` (or FSDP around the blocks alone) keeps the deltas as plain tensors on every
    process: nothing averages their gradients, each process trains its own delta on its own data, and the
    run ends without an error. The DeltaModel must be FSDP2's root (`fully_shard(dm)`) or inside FSDP1's
    root: an FSDP1 unit inside it that is a root (`_is_root`, set at its first forward) says it is not.
    Only a training forward of a multi-process launch is checked (a walk over the modules, ~25 us for 500)."""
    if not (torch.is_grad_enabled() and dm.training and _several_processes()):
        return
    _check_ddp_registered(dm)
    fsdp2, fsdp1 = _fsdp2_type(), _fsdp1_type()
    if fsdp2 is not None and isinstance(dm, fsdp2):
        return
    for module in dm.backbone.modules():
        if (fsdp2 is not None and isinstance(module, fsdp2)) or (
            fsdp1 is not None and isinstance(module, fsdp1) and getattr(module, "_is_root", None) is True
        ):
            name = next(iter(dm.deltas), "")
            raise DeltaError(
                f"delta {name!r} is outside FSDP while the backbone's modules are sharded: nothing averages "
                f"its gradients across processes, so each would train its own delta; {OUTSIDE_FIX}"
            )


def _check_ddp_registered(dm: DeltaModel) -> None:
    """A delta added after DistributedDataParallel wrapped the DeltaModel: DDP averages the gradients of the
    tensors it registered when it wrapped it, and trained the new delta per process, without an error."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
    registered = getattr(ddp, "_module_parameters", None) if ddp is not None and ddp.module is dm else None
    if registered is None:
        return
    known = ddp.__dict__.get("_deltatune_known")
    if known is None or known[0] != len(registered):  # DDP's list is fixed at wrapping: counted once
        known = (len(registered), {id(p) for p in registered})
        ddp.__dict__["_deltatune_known"] = known
    for name, delta in dm.deltas.items():
        if any(p.requires_grad and id(p) not in known[1] for p in delta.parameters()):
            raise DeltaError(
                f"delta {name!r} was added after DistributedDataParallel wrapped the model, so DDP averages none of "
                "its gradients and each process would train its own; attach every delta before "
                "accelerator.prepare(dm) / DistributedDataParallel(dm)"
            )


def check_unsharded(dm: DeltaModel, name: str) -> None:
    """Refuse to add a delta to a model FSDP already shards: FSDP registered its tensors when it wrapped the
    model, so the new delta's would lie outside it (LoRA, adapters, (IA)^3 trained per process, silently;
    prompt tuning failed in torch's DTensor dispatch). FSDP needs a process group: without one nothing is
    imported (torch.distributed.fsdp takes 0.6 s to import, once, on the first attach)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    kinds = tuple(t for t in (_fsdp2_type(), _fsdp1_type()) if t is not None)
    sharded = bool(kinds) and (isinstance(dm, kinds) or any(isinstance(m, kinds) for m in dm.backbone.modules()))
    if sharded or any(getattr(p, "_fsdp_flattened", False) for p in dm.backbone.parameters()):
        raise DeltaError(
            f"cannot add {name!r}: the model is already sharded by FSDP, which registered its tensors when it "
            "wrapped it, so the new delta's would lie outside (each process training its own); attach every "
            "delta first, then shard"
        )


def check_wrapped(backbone: torch.nn.Module, deltas: dict) -> None:
    """Refuse a training forward of a backbone that DistributedDataParallel wraps in place of the DeltaModel.

    `accelerator.prepare(model)` or `DistributedDataParallel(model)` with the model deltas were attached to
    (not the DeltaModel): DDP averages the gradients of the backbone's trainable tensors (the head) and of
    none of the deltas', so each process trained its own delta, without an error. DDP names the module it
    runs while its forward runs (`_active_ddp_module`): a class attribute read, nothing else."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
    if ddp is None or ddp.module is not backbone or not any(p.requires_grad for p in deltas.parameters()):
        return
    raise DeltaError(
        "DistributedDataParallel wraps the backbone, not the DeltaModel: it averages the head's gradients and "
        "none of the deltas', so each process would train its own delta; wrap the DeltaModel "
        "(accelerator.prepare(dm), DistributedDataParallel(dm), Trainer(model=dm))"
    )


def _several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fsdp2_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch before FSDP2
        return None
    return FSDPModule


def _fsdp1_type() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return None
    return FullyShardedDataParallel
