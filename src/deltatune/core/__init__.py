"""The core: targeting, attaching, freezing, merging. It names no method."""

from .delta import Delta, DeltaConfig, DeltaError, Hooks
from .model import DeltaModel, attach
from .targeting import TargetError, resolve

__all__ = ["Delta", "DeltaConfig", "DeltaError", "DeltaModel", "Hooks", "TargetError", "attach", "resolve"]
