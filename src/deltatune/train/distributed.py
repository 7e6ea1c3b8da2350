"""What the training loop needs to know about a multi-process launch, in one place.

Outside a launch (no accelerate state, or one process) every function answers as for one process.
"""

from __future__ import annotations

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
    """True outside a distributed launch, and in its first process."""
    return process_share()[0] == 0


def global_mean(accelerator: Any, loss: torch.Tensor) -> float:
    """The loss over the whole global batch (each process holds a slice of it): what one process logs."""
    if accelerator.num_processes == 1:
        return loss.item()
    return accelerator.reduce(loss.detach(), reduction="mean").item()
