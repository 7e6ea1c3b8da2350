"""deltatune: delta tuning (parameter-efficient fine-tuning) of pretrained transformers."""

from .core import Delta, DeltaConfig, DeltaError, DeltaModel, Hooks, TargetError, attach, resolve
from .core.entry import load_delta
from .core.io import DeltaIOError, save_delta
from .interop import peft_config as _peft_config  # noqa: F401  (attach reads PEFT's LoraConfig/IA3Config)
from .interop import sentence_transformers as _sentence_transformers  # noqa: F401  (its trainer reloads checkpoints)
from .methods import (
    METHODS,
    AdapterConfig,
    BitFitConfig,
    CompacterConfig,
    DiffPruningConfig,
    IA3Config,
    LayerNormConfig,
    LoRAConfig,
    LowRankAdapterConfig,
    ParallelAdapterConfig,
    PrefixConfig,
    PromptConfig,
    SAIDConfig,
    SelectiveConfig,
    get_config,
)
from .version import __version__

__all__ = [
    "METHODS",
    "AdapterConfig",
    "BitFitConfig",
    "CompacterConfig",
    "DeltaIOError",
    "DiffPruningConfig",
    "IA3Config",
    "LayerNormConfig",
    "LoRAConfig",
    "LowRankAdapterConfig",
    "ParallelAdapterConfig",
    "PrefixConfig",
    "PromptConfig",
    "SAIDConfig",
    "SelectiveConfig",
    "load_delta",
    "save_delta",
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
