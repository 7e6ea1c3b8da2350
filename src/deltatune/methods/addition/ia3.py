"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class IA3Config(DeltaConfig):
    method: ClassVar[str] = "ia3"
    family: ClassVar[str] = "addition"

    def build(self):
        raise NotImplementedError("ia3 is not written yet")
