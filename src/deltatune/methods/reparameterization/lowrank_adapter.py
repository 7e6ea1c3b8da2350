"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class LowRankAdapterConfig(DeltaConfig):
    method: ClassVar[str] = "lowrank_adapter"
    family: ClassVar[str] = "reparameterization"

    def build(self):
        raise NotImplementedError("lowrank_adapter is not written yet")
