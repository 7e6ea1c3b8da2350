"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class PromptConfig(DeltaConfig):
    method: ClassVar[str] = "prompt"
    family: ClassVar[str] = "addition"

    def build(self):
        raise NotImplementedError("prompt is not written yet")
