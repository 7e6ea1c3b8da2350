"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class LayerNormConfig(DeltaConfig):
    method: ClassVar[str] = "layernorm"
    family: ClassVar[str] = "specification"

    def build(self):
        raise NotImplementedError("layernorm is not written yet")
