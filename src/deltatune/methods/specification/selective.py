"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class SelectiveConfig(DeltaConfig):
    method: ClassVar[str] = "selective"
    family: ClassVar[str] = "specification"

    def build(self):
        raise NotImplementedError("selective is not written yet")
