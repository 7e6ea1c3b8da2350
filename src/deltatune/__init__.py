"""deltatune: delta tuning (parameter-efficient fine-tuning) of pretrained transformers."""

from .core import Delta, DeltaConfig, DeltaError, DeltaModel, Hooks, TargetError, attach, resolve
from .methods import METHODS, get_config

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Delta",
    "DeltaConfig",
    "DeltaError",
    "DeltaModel",
    "Hooks",
    "TargetError",
    "attach",
    "get_config",
    "resolve",
    "__version__",
]
