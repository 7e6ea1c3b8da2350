"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class BitFitConfig(DeltaConfig):
    method: ClassVar[str] = "bitfit"
    family: ClassVar[str] = "specification"

    def build(self):
        raise NotImplementedError("bitfit is not written yet")
