"""The method registry: a method is one file under its family's folder plus one line here."""

from __future__ import annotations

import dataclasses

from ..core.delta import DeltaConfig
from .addition.adapter import AdapterConfig
from .addition.compacter import CompacterConfig
from .addition.ia3 import IA3Config
from .addition.parallel_adapter import ParallelAdapterConfig
from .addition.prefix import PrefixConfig
from .addition.prompt import PromptConfig
from .reparameterization.adalora import AdaLoRAConfig
from .reparameterization.dora import DoRAConfig
from .reparameterization.loha import LoHaConfig
from .reparameterization.lokr import LoKrConfig
from .reparameterization.lora import LoRAConfig
from .reparameterization.lowrank_adapter import LowRankAdapterConfig
from .reparameterization.oft import OFTConfig
from .reparameterization.said import SAIDConfig
from .reparameterization.vera import VeRAConfig
from .specification.bitfit import BitFitConfig
from .specification.diff_pruning import DiffPruningConfig
from .specification.layernorm import LayerNormConfig
from .specification.random_subset import RandomSubsetConfig
from .specification.selective import SelectiveConfig

METHODS: dict[str, type[DeltaConfig]] = {
    cls.method: cls
    for cls in (
        AdapterConfig,
        ParallelAdapterConfig,
        CompacterConfig,
        PrefixConfig,
        PromptConfig,
        IA3Config,
        BitFitConfig,
        LayerNormConfig,
        SelectiveConfig,
        DiffPruningConfig,
        RandomSubsetConfig,
        LoRAConfig,
        LowRankAdapterConfig,
        SAIDConfig,
        DoRAConfig,
        LoHaConfig,
        LoKrConfig,
        OFTConfig,
        VeRAConfig,
        AdaLoRAConfig,
    )
}


def get_config(name: str, **kwargs: object) -> DeltaConfig:
    """`get_config("lora", r=4)`: a config by method name, with a clear error for a wrong name."""
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown method {name!r}{hint} (known: {', '.join(METHODS)})")
    fields = sorted(f.name for f in dataclasses.fields(METHODS[name]))
    stray = sorted(set(kwargs) - set(fields))
    if stray:
        raise ValueError(f"{name} has no setting {stray[0]!r}; its settings: {', '.join(fields)}")
    return METHODS[name](**kwargs)
