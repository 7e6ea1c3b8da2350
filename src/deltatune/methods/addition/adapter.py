"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class AdapterConfig(DeltaConfig):
    method: ClassVar[str] = "adapter"
    family: ClassVar[str] = "addition"

    def build(self):
        raise NotImplementedError("adapter is not written yet")
