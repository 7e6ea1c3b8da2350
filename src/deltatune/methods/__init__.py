"""The methods: one file per method under its family's folder; each file registers itself.

Importing a method file defines its config class, which registers it in `core.registry`. This
package imports every public module of the three family folders (files starting with `_` hold
shared pieces), family by family in the paper's order and alphabetically within a family, and
re-exports each config class by its name (`deltatune.methods.LoRAConfig`). A new method is one
file in its family's folder: nothing here changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..core.registry import METHODS, get_config

FAMILIES = ("addition", "specification", "reparameterization")  # the paper's order


def _import_all() -> dict[str, type]:
    configs = {}
    for family in FAMILIES:
        folder = Path(__file__).parent / family
        for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{family}.{info.name}")
            configs |= {cls.__name__: cls for cls in METHODS.values() if cls.__module__ == module.__name__}
    return configs


_CONFIGS = _import_all()
globals().update(_CONFIGS)

__all__ = ["METHODS", "get_config", *sorted(_CONFIGS)]
