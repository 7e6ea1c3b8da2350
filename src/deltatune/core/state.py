"""Which tensors a delta's state may hold, checked whole before any is copied.

A state handed to `DeltaModel.load_delta_state_dict` comes from a checkpoint, another process or a
caller's own code: loading it may reach the delta's tensors and the task head's (`__head__.` keys),
no other backbone weight, and a state that does not fit (a stray key, a wrong shape, a NaN) must fail
before the first copy so that no half-loaded delta ever runs. These rules are about names and
tensors, not the model's life cycle, so they live apart from `DeltaModel`.
"""

from __future__ import annotations

import torch
from torch import nn

from .delta import DeltaError
from .targeting import HEAD_KEY

# Trainer.save_model and Trainer's checkpoints write a DeltaModel's state_dict() as model.safetensors: the
# deltas' tensors without their configs, which a folder load needs (a PEFT user expects save_model to
# write what from_pretrained reads, as PeftModel's does).
TRAINER_STATE_HINT = (
    "it holds a model.safetensors, the state dict that Trainer.save_model and Trainer's checkpoints write for a "
    "DeltaModel (tensors without the deltas' configs): rebuild the DeltaModel as for training and call "
    "dm.load_state_dict(safetensors.torch.load_file(file)); for a folder this call reads, save with "
    "dm.save_pretrained(folder) after training (SaveDeltaCallback does it at each Trainer checkpoint)"
)


def check_state(
    name: str, delta: nn.Module, state: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], strict: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`state` split into (the delta's own tensors, the head's by parameter name), or a DeltaError naming the fix.

    `heads` maps the model's task head parameter names to the parameters; `strict` also requires
    every tensor of the delta to be present.
    """
    head = {k.removeprefix(HEAD_KEY): v for k, v in state.items() if k.startswith(HEAD_KEY)}
    own = {k: v for k, v in state.items() if not k.startswith(HEAD_KEY)}
    allowed = set(heads)
    stray = sorted(set(head) - allowed)
    if stray:
        raise DeltaError(
            f"{stray[0]!r} is not a task head parameter of this model (its head: {', '.join(sorted(allowed)) or 'none'}); "
            "a delta's state may hold only its own tensors and the task head's"
        )
    bad = [n for n, v in head.items() if heads[n].shape != v.shape]
    if bad:
        raise DeltaError(
            f"head tensor {bad[0]!r} has shape {tuple(head[bad[0]].shape)}, the model's {tuple(heads[bad[0]].shape)}"
        )
    mine = delta.state_dict()
    unexpected, missing = sorted(set(own) - set(mine)), sorted(set(mine) - set(own)) if strict else []
    wrong = [k for k in own if k in mine and tuple(own[k].shape) != tuple(mine[k].shape)]
    if unexpected or missing or wrong:
        detail = (
            f"shape {tuple(own[wrong[0]].shape)} for {wrong[0]!r}, here {tuple(mine[wrong[0]].shape)}" if wrong else ""
        )
        raise DeltaError(
            f"the state does not fit delta {name!r}: unexpected keys {unexpected[:5]}, missing keys {missing[:5]}"
            f"{'; ' + detail if detail else ''}; pass the state dm.delta_state_dict({name!r}) gives"
        )
    targets = {**{k: mine[k] for k in own if k in mine}, **{HEAD_KEY + n: heads[n] for n in head}}
    kind = next((k for k, v in state.items() if v.is_floating_point() != targets[k].is_floating_point()), None)
    if kind is not None:  # an int tensor cast into float weights (or the reverse) is a different file, not a state
        raise DeltaError(
            f"tensor {kind!r} is {state[kind].dtype}, where the delta holds {targets[kind].dtype}; was the file written "
            "for another delta or edited?"
        )
    nonfinite = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None)
    if nonfinite is not None:
        raise DeltaError(
            f"tensor {nonfinite!r} holds NaN or infinite values; load a state from a run that did not diverge"
        )
    return own, head
