"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class ParallelAdapterConfig(DeltaConfig):
    method: ClassVar[str] = "parallel_adapter"
    family: ClassVar[str] = "addition"

    def build(self):
        raise NotImplementedError("parallel_adapter is not written yet")
