"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class PrefixConfig(DeltaConfig):
    method: ClassVar[str] = "prefix"
    family: ClassVar[str] = "addition"

    def build(self):
        raise NotImplementedError("prefix is not written yet")
