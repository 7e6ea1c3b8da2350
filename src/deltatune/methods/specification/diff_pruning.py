"""STUB: being written."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ...core.delta import DeltaConfig


@dataclasses.dataclass
class DiffPruningConfig(DeltaConfig):
    method: ClassVar[str] = "diff_pruning"
    family: ClassVar[str] = "specification"

    def build(self):
        raise NotImplementedError("diff_pruning is not written yet")
