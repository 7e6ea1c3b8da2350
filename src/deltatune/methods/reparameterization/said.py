"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class SAIDConfig(DeltaConfig):
    method: ClassVar[str] = "said"
    family: ClassVar[str] = "reparameterization"

    def build(self):
        raise NotImplementedError("said is not written yet")
