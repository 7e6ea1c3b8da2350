"""The allowed values of each TrainConfig setting, for settings that do not come through a flag (study specs).

`deltatune train` checks the same rules in its flag types (cli/args.py); a spec's `train:` section is
checked here before any run starts, so `lr: -1` or `max_length: 0` fail in the first second with the
setting named, instead of training "successfully" or failing in every run.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from .trainer import TrainConfig

MAX_SEED = 2**32 - 1  # numpy's and torch's seed range
# the lower bound of each number (inclusive unless listed in _ABOVE), where it is not "at least 1" / "above 0"
_AT_LEAST = {"warmup_ratio": 0.0, "weight_decay": 0.0, "min_steps": 0, "seed": 0}
_BELOW = {"warmup_ratio": 1.0, "seed": MAX_SEED + 1}
_CHOICES = {"mixed_precision": ("no", "bf16", "fp16")}


def check_train_value(key: str, value: Any) -> None:
    """Raise ValueError saying what `key` takes when `value` is not allowed."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields:
        raise ValueError(f"not a training setting; use one of {', '.join(sorted(fields))}")
    hint = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in args:
            return
        raise ValueError("must be set (it has no `none`)")
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ValueError(f"must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        return
    if bool in args:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return
    is_int = int in args and float not in args
    if isinstance(value, bool) or not isinstance(value, int | float) or (is_int and not isinstance(value, int)):
        raise ValueError(f"must be {'a whole number' if is_int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    low = _AT_LEAST.get(key, 1 if is_int else None)
    if low is None and value <= 0:
        raise ValueError(f"must be a number above 0, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"must be at least {low}, got {value!r}")
    if key in _BELOW and value >= _BELOW[key]:
        raise ValueError(f"must be below {_BELOW[key]}, got {value!r}")


def check_max_length(model_name: str, max_length: int, flag: str = "--max-length") -> None:
    """Refuse a max length beyond the model's position table before anything runs (a long input would
    otherwise end in a tensor-size error from inside the model)."""
    from transformers import AutoConfig

    from ..backbones import model_path

    try:
        config = AutoConfig.from_pretrained(model_path(model_name)).get_text_config()
    except (OSError, ValueError):
        return  # the model's own loading says what is wrong with it
    most = next(
        (v for k in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(config, k, None), int)), None
    )
    if most is not None and max_length > most:
        raise ValueError(
            f"{flag} {max_length} is more than {model_name} can read ({most} positions); use at most {most}"
        )
