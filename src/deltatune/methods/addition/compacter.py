"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class CompacterConfig(DeltaConfig):
    method: ClassVar[str] = "compacter"
    family: ClassVar[str] = "addition"

    def build(self):
        raise NotImplementedError("compacter is not written yet")
