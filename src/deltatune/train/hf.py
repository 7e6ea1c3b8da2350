"""Training a DeltaModel with `transformers.Trainer`: what a Trainer user needs beyond the model itself.

A plain `Trainer(model=dm, args=TrainingArguments(...))` already works: the DeltaModel advertises
its backbone's forward signature (so the default `remove_unused_columns=True` keeps the right
columns and finds the labels) and its `state_dict()` is only the deltas and the trained head (so
every checkpoint is delta-sized and `resume_from_checkpoint` loads it back exactly); see
`core.conventions`. What Trainer cannot know is that methods want very different learning rates
(prompt tuning 3e-2, LoRA 1e-3, the head 1e-2, Trainer's default 5e-5 is tuned for full
fine-tuning): `optimizer(dm)` builds the AdamW that `deltatune train` uses, one group per delta at
its method's `default_lr`, to pass as `Trainer(..., optimizers=(optimizer(dm), None))`; Trainer
then builds its scheduler on it and checkpoints and restores its state as usual.

Methods with a training schedule (AdaLoRA's rank allocation) act after each optimizer step, while
the gradients are still there: `DeltaScheduleCallback` calls their `on_step` from Trainer's
`on_optimizer_step` event, as `fit` does. Their loss terms need nothing: `DeltaModel.forward` adds
them to the returned loss while training.

`SaveDeltaCallback` additionally writes each checkpoint in deltatune's own format (a
`DeltaModel.save_pretrained` folder, readable by `DeltaModel.from_pretrained` and `deltatune
evaluate`), for users who want the deltas out of Trainer's checkpoints without rebuilding the model.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from safetensors.torch import load_file, save
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..core.atomic import write_file
from ..core.delta import Delta
from ..core.model import DeltaModel
from .optim import DEFAULT_HEAD_LR, adamw, param_groups  # noqa: F401 - param_groups is public here


def optimizer(
    dm: DeltaModel, lr: float | None = None, head_lr: float = DEFAULT_HEAD_LR, **adamw_kwargs: Any
) -> torch.optim.AdamW:
    """The AdamW `deltatune train` uses, for `Trainer(..., optimizers=(optimizer(dm), None))`."""
    return adamw(param_groups(dm, lr, head_lr), **adamw_kwargs)


SCHEDULE_FILE = "deltatune_schedule.safetensors"  # beside a Trainer checkpoint: the deltas' schedules


class SaveDeltaCallback(TrainerCallback):
    """Also writes every Trainer checkpoint as `<checkpoint>/<subfolder>/`, a `save_pretrained` folder."""

    def __init__(self, subfolder: str = "delta") -> None:
        self.subfolder = subfolder

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        dm = _delta_model(model, "SaveDeltaCallback")
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.subfolder)
        dm.save_pretrained(folder, is_main_process=state.is_world_process_zero)  # every process: FSDP2 gathers
        return control


def _delta_model(model: Any, what: str) -> DeltaModel:
    dm = model
    while not isinstance(dm, DeltaModel) and hasattr(dm, "module"):  # DDP and friends wrap it
        dm = dm.module
    if not isinstance(dm, DeltaModel):
        raise TypeError(f"{what} needs Trainer(model=<a DeltaModel>), got {type(model).__name__}")
    return dm


class DeltaScheduleCallback(TrainerCallback, ExportableState):
    """Runs each delta's `on_step(step, total)` after every optimizer step (AdaLoRA's rank budget), and its
    `finalize()` when training ends, as `fit` does: diff pruning prunes to its sparsity (without it, a Trainer run
    saved a dense diff, 100% of entries where 0.5% were asked for), AdaLoRA holds its final budget.

    Trainer clears the gradients before `on_step_end`, so this hooks `on_optimizer_step`, which comes
    right after `optimizer.step()`; `state.global_step` is the step just finished minus one there.
    `on_train_end` comes after `load_best_model_at_end` has loaded the best step: that is what is finalized.

    The schedules' state (AdaLoRA's importance averages) lives outside the parameters, so Trainer's checkpoints did
    not hold it and a resumed run kept other ranks than an uninterrupted one (1e-2 off). As an `ExportableState`,
    the callback writes it beside each checkpoint (`deltatune_schedule.safetensors`, its path in trainer_state.json)
    and puts it back when `resume_from_checkpoint` starts there.
    """

    def __init__(self) -> None:
        self._dm: DeltaModel | None = None
        self._folder: str | None = None  # the checkpoint folder Trainer writes at this step, if it saves

    def state(self) -> dict:
        """Called by Trainer as it saves a checkpoint (after the model): the schedules go beside it."""
        tensors = {}
        for name, delta in self._dm.deltas.items() if self._dm is not None else ():
            tensors |= {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in delta.schedule_state().items()}
        if not tensors or self._folder is None or not os.path.isdir(self._folder):
            return {"args": {}, "attributes": {}}
        file = os.path.abspath(os.path.join(self._folder, SCHEDULE_FILE))
        write_file(file, save(tensors))
        return {"args": {}, "attributes": {"schedule_file": file}}

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        self._dm = _delta_model(model, "DeltaScheduleCallback")
        self._folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return control

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        deltas = _delta_model(model, "DeltaScheduleCallback").deltas
        if state.global_step == 0:
            return control
        # a checkpoint written without this callback has no entry, and Trainer's next save failed on a KeyError
        saved = state.stateful_callbacks.setdefault(type(self).__name__, {"args": {}, "attributes": {}})
        file = (saved[-1] if isinstance(saved, list) else saved).get("attributes", {}).get("schedule_file")
        if file and os.path.isfile(file):
            tensors = load_file(file)
            for name, delta in deltas.items():
                own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
                if own:
                    delta.load_schedule_state(own)
            return control
        names = [n for n, d in deltas.items() if type(d).on_step is not Delta.on_step]
        if names and not any(d.schedule_state() for d in deltas.values()):
            warnings.warn(
                f"resuming at step {state.global_step}: the checkpoint holds no training schedule (it was written "
                f"without DeltaScheduleCallback, or its {SCHEDULE_FILE} moved), so the schedule of delta "
                f"{', '.join(map(repr, names))} (AdaLoRA's importance averages) starts over and the ranks it keeps "
                "can differ from an uninterrupted run's",
                stacklevel=2,
            )
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        for delta in _delta_model(model, "DeltaScheduleCallback").deltas.values():
            if delta.took_part():
                delta.on_step(state.global_step + 1, state.max_steps)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        for delta in _delta_model(model, "DeltaScheduleCallback").deltas.values():
            if any(p.requires_grad for p in delta.parameters()):  # what trained; a loaded frozen delta stays
                delta.finalize()
        return control
