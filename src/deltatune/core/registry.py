"""The method registry: every `DeltaConfig` subclass that sets `method` registers itself here.

A method is one file; defining its config class is what makes it known (`DeltaConfig.__init_subclass__`
calls `register`). The rest of the system (the CLI, delta.json, the study) looks methods up by name
here and never imports a method file by name. `deltatune.methods` imports the method files, so that
importing deltatune fills the registry.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .delta import DeltaConfig

METHODS: dict[str, type[DeltaConfig]] = {}

# Readers of configs written for other libraries, (config, model) -> DeltaConfig, or None where the object is not
# theirs; `deltatune.interop.peft_config` registers PEFT's (LoraConfig, IA3Config, ...). The core names no library.
CONFIG_READERS: list[Callable[[Any, nn.Module], DeltaConfig | None]] = []
# Attributes that another library's tools call on a DeltaModel's class (`core.signed`), given the backbone's class:
# `deltatune.interop.sentence_transformers` registers how its trainer reloads a checkpoint.
CLASS_EXTRAS: list[Callable[[type], dict[str, Any]]] = []


def register(cls: type[DeltaConfig]) -> type[DeltaConfig]:
    """Make `cls` known under `cls.method`; a second class claiming the same name is refused by name."""
    name = cls.method
    known = METHODS.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"method name {name!r} is taken by {known.__module__}.{known.__qualname__}; "
            f"give {cls.__module__}.{cls.__qualname__} another `method`"
        )
    METHODS[name] = cls  # a re-imported module (importlib.reload) replaces its own class
    return cls


def method_name(name: str) -> str:
    """A method's name as registered, from the ways users write it: "LoRA", PEFT's "LORA", "diff-pruning"."""
    if not isinstance(name, str):
        raise TypeError(f"a method name is a string such as 'lora', got {type(name).__name__} {name!r}")
    return name.strip().lower().replace("-", "_")


def get_config(name: str, **kwargs: object) -> DeltaConfig:
    """`get_config("lora", r=4)`: a config by method name, with a clear error for a wrong name.

    Names are read as written elsewhere too: "LoRA", PEFT's "LORA", "diff-pruning" name lora and diff_pruning."""
    name = method_name(name)
    if name not in METHODS:
        parts = [method_name(p) for p in re.split(r"[,+;\s]+", name) if p]
        if len(parts) > 1 and all(p in METHODS for p in parts):  # "lora,bitfit": a combination in one name
            raise KeyError(
                f"{name!r} names {len(parts)} methods; combine them one per delta: "
                + " ".join(f"--method {p}" for p in parts)
                + f" on the command line, dm.add({parts[1]!r}, {parts[1]!r}) after attaching {parts[0]!r} in Python"
            )
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown method {name!r}{hint} (known: {', '.join(METHODS)})")
    try:
        return METHODS[name](**kwargs)
    except TypeError as e:  # DeltaConfig names an unknown setting (PEFT's spelling mapped): a ValueError here
        if "has no setting" in str(e):
            raise ValueError(str(e)) from None
        raise


def as_config(config: Any, model: nn.Module) -> Any:
    """What `add` was given, as a DeltaConfig where it can be read as one: a method name (its defaults), a
    delta.json dict ({"method": "lora", "r": 8}), or another library's config (`CONFIG_READERS`). Anything else is
    returned as it came, for the caller's error."""
    if isinstance(config, str):  # a method name with its defaults: attach(model, "lora")
        return get_config(config)
    if isinstance(config, dict) and "method" in config:  # as delta.json keeps it
        return get_config(config["method"], **{k: v for k, v in config.items() if k != "method"})
    for reader in CONFIG_READERS:
        read = reader(config, model)
        if read is not None:
            return read
    return config


def check_name(name: str) -> None:
    """Names become module keys and folder names (delta-<name>/): no dots, no path separators."""
    bad = not isinstance(name, str) or not 0 < len(name) <= 100 or not name.isprintable()
    if bad or any(c in name for c in "./\\\0"):
        msg = "delta name must be a non-empty string of at most 100 printable characters without dots or slashes"
        raise ValueError(f"{msg}, got {name!r}")


def not_a_config(config: Any) -> str:
    """What `dm.add` was given instead of a method config, with the fix, in one line."""
    if isinstance(config, type) and METHODS.get(getattr(config, "method", None)) is config:  # a method's class
        return f"got the class {config.__name__}; pass an instance, {config.__name__}() or {config.__name__}(r=...)"
    if isinstance(config, list | tuple):
        return "one delta per call: to combine methods, attach one and add the others, dm.add('bitfit', 'bitfit')"
    return f"expected a method config such as deltatune.get_config(method, **settings), got {type(config).__name__}"
