"""What the training loop needs to know about a multi-process launch, in one place.

Outside a launch (no accelerate state, or one process) every function answers as for one process.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch


def process_share() -> tuple[int, int]:
    """(this process's index, number of processes) of a distributed launch; (0, 1) otherwise."""
    from accelerate.state import PartialState

    if not PartialState._shared_state:
        return 0, 1
    state = PartialState()
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    """True outside a distributed launch, and in its first process.

    Before accelerate's state exists (a command's banner, printed before the run starts) the launcher's
    RANK says it: reading the state alone, every process of a torchrun launch answered True.
    """
    from accelerate.state import PartialState

    if not PartialState._shared_state:
        return os.environ.get("RANK", "0") == "0"
    return process_share()[0] == 0


def global_mean(accelerator: Any, loss: torch.Tensor) -> float:
    """The loss over the whole global batch (each process holds a slice of it): what one process logs."""
    if accelerator.num_processes == 1:
        return loss.item()
    return accelerator.reduce(loss.detach(), reduction="mean").item()


def end_process_group() -> None:
    """Destroy the default process group of a launch, if one is up (what `Accelerator.end_training()` does).

    Left alone, the gloo group (its two worker threads and its socket loop thread) lived into interpreter
    shutdown, and was destroyed while Python cleared module globals (`Py_FinalizeEx` -> `finalize_modules`),
    in an order that depends on every module imported. With torchao installed (transformers imports it:
    1,031 more modules), a 2-process `deltatune train` once aborted in rank 1 at the end of the run
    (docs/ecosystem.md). `make_accelerator` registers this at exit, so it runs after the last collective
    and before that shutdown.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_accelerator(
    mixed_precision: str,
    grad_accum: int,
    batch_size: int,
    log_with: list[str] | None = None,
    logging_dir: str | None = None,
) -> Any:
    """An Accelerator for a run's precision, gradient accumulation, global batch size and trackers
    (`log_with`, checked by train.tracking.parse; `logging_dir` for those that write files).

    accelerate keeps its state in a process-wide singleton that refuses a second precision; a study
    runs fp32 and bf16 runs one after another in one process, so outside a distributed launch the
    state is reset when the precision changes (under `accelerate launch` the launch decides).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if AcceleratorState._shared_state and PartialState().distributed_type == DistributedType.NO:
        if AcceleratorState().mixed_precision != mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=True)
    from accelerate.utils import DataLoaderConfiguration

    # several processes without a GPU (torchrun on CPUs): accelerate uses gloo only when told cpu=True
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # split_batches: `batch_size` is the global batch, each of N processes gets 1/N of every batch, so
    # steps per epoch, the schedule and every update equal one process's (see docs/ecosystem.md)
    processes = PartialState(cpu=cpu).num_processes
    if processes > 1:  # once per process: atexit.unregister first keeps a study's many runs to one entry
        atexit.unregister(end_process_group)
        atexit.register(end_process_group)
    if batch_size % processes:
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must split evenly over {processes} processes; "
            f"use a multiple of {processes}"
        )
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=log_with or None,
        project_dir=logging_dir,
    )
