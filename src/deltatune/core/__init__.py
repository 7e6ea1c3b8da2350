"""The core: targeting, attaching, freezing, merging. It names no method."""

from .delta import Delta, DeltaConfig, DeltaError, Hooks
from .entry import attach, load_delta
from .model import DeltaModel
from .targeting import TargetError, resolve

__all__ = [
    "Delta",
    "DeltaConfig",
    "DeltaError",
    "DeltaModel",
    "Hooks",
    "TargetError",
    "attach",
    "load_delta",
    "resolve",
]
