"""The one place where a method's settings are checked: from their declared types and ranges.

A config field says what it accepts: its type annotation (`int`, `float`, `tuple[str, ...]`,
`str | None`, ...) and, where a range matters, `setting(default, ge=..., lt=..., size=True)`.
`check_fields` reads both generically, so the core never names a method's fields, and every value
that enters (Python, YAML spec, CLI, delta.json) is checked the same way before anything is built:
ints are ints (not bools, floats or strings), numbers are finite, sizes are bounded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from . import compat_config
from .registry import METHODS

MAX_SIZE = 1 << 16  # largest size setting (rank, bottleneck, tokens): beyond it a delta outgrows any backbone
MAX_ITEMS = 4096  # longest list setting
MAX_INT = (1 << 63) - 1  # what torch can hold (seeds, counts)


# PEFT's config fields that every method shares, and deltatune's setting or what replaces it; each
# config adds its own (`DeltaConfig.peft_names`, e.g. LoRA's lora_alpha)
PEFT_NAMES: dict[str, tuple[str | None, str]] = {
    "target_modules": ("targets", "'targets' (module names, regexes or aliases such as 'attn.q')"),
    "layers_to_transform": ("layers", "'layers'"),
    "modules_to_save": (None, "attach(..., train_head=True) for the task head"),
    "task_type": (None, "not needed, the task is read from the model class"),
    "use_dora": (None, "DoRAConfig"),
    "fan_in_fan_out": (None, "not needed, GPT-2's Conv1D layers are handled by the method"),
    "inference_mode": (None, "not needed, call DeltaModel.eval() or merge"),
    "bias": (None, "BitFitConfig, for trained biases"),
}


def unknown_setting_message(cls: type, key: str) -> str:
    """One line for an unknown config setting: PEFT's name mapped to ours, else the closest names."""
    fields = [f.name for f in dataclasses.fields(cls)]
    own = getattr(cls, "peft_names", {}).get(key)
    field, text = (own, repr(own)) if own else PEFT_NAMES.get(key, (None, ""))
    if text and field in fields:
        return f"{cls.__name__} has no setting {key!r}; deltatune calls it {text}"
    if text and field is None:
        return f"{cls.__name__} has no setting {key!r} (a PEFT setting); in deltatune: {text}"
    close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{cls.__name__} has no setting {key!r}; {hint}its settings: {', '.join(fields)}"


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, size: bool = False, limit: str | None = None) -> Any:  # fmt: skip
    """A config field with its allowed range. `size=True`: the method's size knob, an int in [1, MAX_SIZE].

    `limit="width"` bounds it by the model it is attached to (checked by `check_limits` at attach
    time, when the model is known): at most the hidden size, since a rank or bottleneck beyond it adds
    parameters, never capacity. (Prompt tokens have no such bound: deltatune numbers them position 0.)
    """
    if size:
        ge, le = 1 if ge is None else ge, MAX_SIZE if le is None else le
    if limit not in (None, *LIMITS):
        raise ValueError(f"limit must be one of {', '.join(LIMITS)}, got {limit!r}")
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "size": size, "limit": limit}
    return dataclasses.field(default=default, metadata=meta)


LIMITS = {"width": "hidden size"}  # what a size setting may be bounded by, as the message names it


def model_limit(model: Any, kind: str) -> int | None:
    """The model's bound of this kind (its hidden size, read by `core.compat_config`); None when unknown."""
    return compat_config.model_width(model) if kind == "width" else None


def check_limits(config: Any, model: Any) -> None:
    """Refuse a size setting beyond what this model can use, naming the setting and the model's limit."""
    for field in dataclasses.fields(config):
        kind = field.metadata.get("limit")
        value = getattr(config, field.name)
        if isinstance(value, dict):  # per-module sizes (LoRA's rank_pattern): the largest must fit
            value = max((v for v in value.values() if isinstance(v, int) and not isinstance(v, bool)), default=None)
        if kind is None or not isinstance(value, int) or isinstance(value, bool):
            continue
        bound = model_limit(model, kind)
        if bound is None:
            continue
        if value > bound:
            raise ValueError(
                f"{type(config).__name__}.{field.name} is {value}, but {type(model).__name__} has a {LIMITS[kind]} "
                f"of {bound} (a rank or bottleneck beyond it adds parameters, never capacity); use at most {bound}"
            )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def size_field(cls: type) -> str | None:
    """The name of the field declared `size=True` (what a parameter budget tunes), or None."""
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("size")), None)


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if not isinstance(value, list | tuple) or len(value) > MAX_ITEMS:
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
        return all(_conforms(v, args[0]) for v in value) if args else True
    if origin is dict:
        if not isinstance(value, dict) or len(value) > MAX_ITEMS:
            return False
        return all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()) if args else True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not know: the method's own validate decides


def describe(hint: Any) -> str:
    """A type annotation in words, for messages."""
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    words = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    if origin is dict and args:
        return f"a mapping of {describe(args[0]).removeprefix('a ')}s to {describe(args[1]).removeprefix('an ').removeprefix('a ')}s"
    if origin in (tuple, list, Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        inner = describe(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
    return getattr(hint, "__name__", str(hint))


def _has_range(meta: Any) -> bool:
    return any(meta.get(k) is not None for k in ("ge", "gt", "le", "lt"))


def _range_text(meta: Any, is_int: bool, noun: bool = False) -> str:
    """The allowed range in words: 'a positive integer (at most 64)', '> 0', 'in [0, 1)'."""
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    kind = "an integer" if is_int else "a finite number"
    if is_int and ge == 1 and gt is None and lt is None:
        return "a positive integer"  # its upper bound, if any, is said after the value (_bound_note)
    if le is None and lt is None and (ge is None) != (gt is None):
        return f"{kind} {'>= ' + str(ge) if ge is not None else '> ' + str(gt)}"
    low = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else "(-inf")
    high = f"{le}]" if le is not None else (f"{lt})" if lt is not None else "inf)")
    return f"{kind + ' ' if noun else ''}in {low}, {high}"


def _bound_note(meta: Any, is_int: bool) -> str:
    le = meta.get("le")
    return f" (at most {le})" if is_int and meta.get("ge") == 1 and le is not None else ""


def _in_range(value: Any, meta: dict[str, Any]) -> bool:
    if isinstance(value, dict):  # a per-module mapping: each value has the setting's range
        return all(_in_range(v, meta) for v in value.values())
    if not isinstance(value, int | float) or isinstance(value, bool):
        return True  # None (where allowed) and non-numbers have no range
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    return not (
        (ge is not None and value < ge)
        or (gt is not None and value <= gt)
        or (le is not None and value > le)
        or (lt is not None and value >= lt)
    )


def check_fields(config: Any) -> None:
    """Raise ValueError naming the setting, what it accepts, and the value given."""
    cls = type(config)
    hints = _hints(cls)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        hint = hints.get(field.name, Any)
        where = f"{cls.__name__}.{field.name}"
        numeric = _conforms(0, hint)
        is_int = not _conforms(0.5, hint)
        if not _conforms(value, hint):
            wanted = describe(hint)
            shown = repr(value)
            shown = (
                shown
                if len(shown) <= 80
                else f"{shown[:60]}... ({len(value) if hasattr(value, '__len__') else '?'} items)"
            )
            if numeric and _has_range(field.metadata):
                wanted = _range_text(field.metadata, is_int, noun=True) + (" or None" if _conforms(None, hint) else "")
            note = _bound_note(field.metadata, is_int) if numeric else ""
            raise ValueError(f"{where} must be {wanted}, got {shown} ({type(value).__name__}){note}")
        if isinstance(value, dict) and not _in_range(value, field.metadata):  # a per-module mapping
            key, bad = next((k, v) for k, v in value.items() if not _in_range(v, field.metadata))
            is_int = not _conforms({key: 0.5}, hint)
            note = _bound_note(field.metadata, is_int)
            text = _range_text(field.metadata, is_int, noun=True)
            raise ValueError(f"{where} values must be {text}, got {bad!r} for {key!r}{note}")
        if not _in_range(value, field.metadata):
            note = _bound_note(field.metadata, is_int)
            raise ValueError(f"{where} must be {_range_text(field.metadata, is_int)}, got {value!r}{note}")


def _wants_list(hint: Any) -> bool:
    """Whether a field keeps a list as a list; every other sequence setting is a tuple (as its default)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_wants_list(a) for a in args)
    return origin is list or hint is list


def config_from_dict(data: Any, source: str = "the settings") -> Any:
    """A validated method config from `{"method": name, setting: value, ...}` (delta.json, a spec, the CLI).

    Lists become tuples where the field is a tuple (JSON and YAML have no tuples); unknown methods and
    settings are refused by name.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source} holds a config that is not a mapping of settings ({type(data).__name__})")
    method = data.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{source} names an unknown method {method!r}; known: {', '.join(METHODS)}")
    cls = METHODS[method]
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key not in fields:
            raise ValueError(
                f"{source} gives {method} a setting {key!r} it does not have (its settings: {', '.join(sorted(fields))})"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) and not _wants_list(hints.get(key)) else value
    config = cls(**kwargs)
    try:
        config.validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} holds an invalid {method} config: {err}") from None
    return config
