"""The methods: one file per method under its family's folder; each file registers itself.

Importing a method file defines its config class, which registers it in `core.registry`; this
package only imports the files (in the order the CLI and the tables list them) and re-exports
the registry. A new method is its file plus one import line here.
"""

from __future__ import annotations

from ..core.registry import METHODS, get_config

# the import order is the registration order, which is the order methods are listed in
# isort: off
from .addition.adapter import AdapterConfig
from .addition.parallel_adapter import ParallelAdapterConfig
from .addition.compacter import CompacterConfig
from .addition.prefix import PrefixConfig
from .addition.prompt import PromptConfig
from .addition.ia3 import IA3Config
from .specification.bitfit import BitFitConfig
from .specification.layernorm import LayerNormConfig
from .specification.selective import SelectiveConfig
from .specification.diff_pruning import DiffPruningConfig
from .specification.random_subset import RandomSubsetConfig
from .reparameterization.lora import LoRAConfig
from .reparameterization.lowrank_adapter import LowRankAdapterConfig
from .reparameterization.said import SAIDConfig
from .reparameterization.dora import DoRAConfig
from .reparameterization.loha import LoHaConfig
from .reparameterization.lokr import LoKrConfig
from .reparameterization.oft import OFTConfig
from .reparameterization.vera import VeRAConfig
from .reparameterization.adalora import AdaLoRAConfig
# isort: on

__all__ = [
    "METHODS",
    "AdaLoRAConfig",
    "AdapterConfig",
    "BitFitConfig",
    "CompacterConfig",
    "DiffPruningConfig",
    "DoRAConfig",
    "IA3Config",
    "LayerNormConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoRAConfig",
    "LowRankAdapterConfig",
    "OFTConfig",
    "ParallelAdapterConfig",
    "PrefixConfig",
    "PromptConfig",
    "RandomSubsetConfig",
    "SAIDConfig",
    "SelectiveConfig",
    "VeRAConfig",
    "get_config",
]
