"""Parsing `--method-arg key=value` pairs into a method config."""

from __future__ import annotations

import dataclasses
import json

from ..core.delta import DeltaConfig
from ..methods import METHODS, get_config


def parse_value(text: str) -> object:
    """JSON where it parses (8, 0.1, true, null, [..]); a comma list becomes a tuple; else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        return tuple(parse_value(part.strip()) for part in text.split(",") if part.strip())
    return text


def method_config(name: str, pairs: list[str] | None) -> DeltaConfig:
    kwargs: dict[str, object] = {}
    fields = {f.name for f in dataclasses.fields(METHODS[name])} if name in METHODS else set()
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--method-arg {pair!r} is not key=value, e.g. --method-arg r=8")
        if fields and key not in fields:
            raise ValueError(f"{name} has no setting {key!r}; its settings: {', '.join(sorted(fields))}")
        kwargs[key] = parse_value(value)
    config = get_config(name, **kwargs)
    config.validate()
    return config


def method_configs(names: list[str] | None, pairs: list[str] | None) -> dict[str, DeltaConfig]:
    """Configs for one or more methods; with several, `--method-arg lora.r=4` addresses one of them."""
    names = names or []
    if len(set(names)) != len(names):
        raise ValueError(f"a method is named twice in {names}; each method can be attached once")
    if len(names) <= 1:
        return {n: method_config(n, pairs) for n in names}
    per: dict[str, list[str]] = {n: [] for n in names}
    for pair in pairs or []:
        owner, dot, rest = pair.partition(".")
        if not dot or owner not in per:
            raise ValueError(f"with several methods, write --method-arg <method>.<key>=<value> (got {pair!r})")
        per[owner].append(rest)
    return {n: method_config(n, per[n]) for n in names}
