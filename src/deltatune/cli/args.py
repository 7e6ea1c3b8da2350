"""Flag parsing shared by the commands: `--method-arg key=value` pairs, range-checked numbers, threads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.delta import DeltaConfig
from ..core.registry import method_name
from ..core.settings import unknown_setting_message
from ..methods import METHODS, get_config
from ..train.checks import check_max_length  # noqa: F401 - the commands import it from here


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
            raise ValueError(unknown_setting_message(METHODS[name], key))  # PEFT's names mapped to ours
        kwargs[key] = parse_value(value)
    config = get_config(name, **kwargs)
    config.validate()
    return config


def method_configs(names: list[str] | None, pairs: list[str] | None) -> dict[str, DeltaConfig]:
    """Configs for one or more methods; with several, `--method-arg lora.r=4` addresses one of them."""
    names = [method_name(n) for n in names or []]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is named twice in {names}; each method can be attached once")
    if len(names) <= 1:
        for pair in pairs or []:  # `lora.r=4` with --method adapter read as adapter's setting "lora.r"
            owner, dot, _ = pair.partition("=")[0].partition(".")
            if dot and owner in METHODS and owner not in names:
                raise ValueError(
                    f"--method-arg {pair!r} sets {owner}, which is not among --method ({', '.join(names) or 'none'}); "
                    f"add --method {owner}, or drop the prefix"
                )
        own = [p.split(".", 1)[1] if names and p.startswith(f"{names[0]}.") else p for p in pairs or []]
        return {n: method_config(n, own) for n in names}
    per: dict[str, list[str]] = {n: [] for n in names}
    for pair in pairs or []:
        owner, dot, rest = pair.partition(".")
        owner = method_name(owner)
        if not dot or owner not in per:
            raise ValueError(f"with several methods, write --method-arg <method>.<key>=<value> (got {pair!r})")
        per[owner].append(rest)
    return {n: method_config(n, per[n]) for n in names}


# ----------------------------------------------------------------------------- checked numbers for flags
# argparse calls these on the flag's text; an ArgumentTypeError becomes one line naming the flag.


def _number(text: str, cast: type, test: Callable[[float], bool], wanted: str) -> float:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
    if not (math.isfinite(value) and test(value)):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def positive_int(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 1, "a whole number of at least 1"))


def or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """`kind`, or None for the word `none` (a setting whose None means "no bound" or "off")."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def non_negative_int(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 0, "a whole number of at least 0"))


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a number above 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number of at least 0")


def seed(text: str) -> int:
    """A seed numpy and torch accept: 0 to 2**32 - 1."""
    return int(_number(text, int, lambda v: 0 <= v <= 2**32 - 1, "a whole number from 0 to 4294967295"))


def threads(text: str) -> int:
    """At least 1, at most 4 per core: torch's thread pool segfaults when asked for 100,000 threads."""
    most = 4 * (os.cpu_count() or 1)
    return int(
        _number(
            text, int, lambda v: 1 <= v <= most, f"a whole number of at least 1 and at most {most} (4 per core here)"
        )
    )


def fraction(text: str) -> float:
    """A share strictly between 0 and 1 (e.g. --dev-split 0.1)."""
    return _number(text, float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (e.g. 0.1)")


def columns(text: str) -> dict[str, str]:
    """--columns Review=text,Sentiment=label: which of the data's columns is which field."""
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if not pairs or any(not k.strip() or not eq or not v.strip() for k, eq, v in pairs):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give COLUMN=FIELD pairs separated by commas, e.g. Review=text,Sentiment=label"
        )
    return {k.strip(): v.strip() for k, _, v in pairs}


def unit_interval(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a fraction from 0 up to (not including) 1")


# ----------------------------------------------------------------------------- threads


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is none (not Linux)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(cores: int, window: float = 0.2) -> float:
    """How many cores other processes keep busy right now: CPU use over a short window (this process
    sleeps through it), else the 1-minute load average, which lags a minute behind."""
    first = _cpu_times()
    if first is not None:
        time.sleep(window)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            return cores * (second[0] - first[0]) / (second[1] - first[1])
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads() -> int:
    """CPU threads for torch on a machine others may be using: the cores not already busy, at least 1.

    torch takes every core by default; beside other busy processes that oversubscribes them and a
    training step gets several times slower (docs/training.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, cores - int(busy_cores(cores) + 0.5)))


def set_threads(requested: int | None) -> int:
    """Set torch's intra-op threads: `--threads`, else $OMP_NUM_THREADS when set, else `default_threads()`."""
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "")
    if requested is not None:
        threads = requested
    elif env.isdigit() and int(env) > 0:
        threads = int(env)
    else:
        threads = default_threads()
    torch.set_num_threads(threads)
    return threads


def add_columns_argument(p: argparse.ArgumentParser, default: str) -> None:
    """--columns, as train, eval, predict and subspace take it (`default`: what happens without it)."""
    p.add_argument(
        "--columns",
        type=columns,
        default=None,
        help="which of your data's columns is which field, e.g. Review=text,Sentiment=label (fields: text, "
        f"text_pair, label, source, target; default: {default})",
    )


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=threads,
        default=None,
        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else the cores other processes "
        "are not keeping busy right now, at least 1)",
    )


def _inner_transformer(path: Path) -> str:
    """A sentence-transformers folder of the older layout keeps its transformer in a subfolder that its
    modules.json names (0_Transformer/): the hint that names it, or ''."""
    import json

    try:
        modules = json.loads((path / "modules.json").read_text())
        inner = [path / m["path"] for m in modules if str(m.get("type", "")).endswith(".Transformer")]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return ""
    found = [p for p in inner if (p / "config.json").is_file()]
    return (
        f"; it is a sentence-transformers folder whose transformer is in {found[0]}: --model {found[0]}"
        if found
        else ""
    )


def check_model(name: str) -> None:
    """Fail in milliseconds on a model name that cannot load offline, before anything heavy is imported.

    A short name passes (its package is checked where it is loaded), a path must be a model folder,
    anything else must be in the Hugging Face cache or on a hub that answers now (`backbones.hub_refusal`).
    """
    from ..backbones import ALIASES, SHORT_NAMES, hub_refusal

    if name in SHORT_NAMES or name in ALIASES:
        return  # loading checks the package and names the install command (a command may not load it at all)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return  # dequantized once when loaded (backbones.model_path)
    if path.exists():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
            hint = f"; for its GGUF file pass the file: --model {ggufs[0]}" if ggufs else _inner_transformer(path)
            raise FileNotFoundError(
                f"{name} is not a model folder (no config.json); pass a transformers model folder{hint}"
            )
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed repo id is simply not cached
        cached = False
    if not cached:
        reason = hub_refusal(name)
        if reason is None:
            return  # on the hub, which answers: transformers downloads it when the command loads it
        raise ValueError(
            f"unknown model {name!r}: not a short name ({', '.join(SHORT_NAMES)}), a local model folder, "
            f"or a model in the Hugging Face cache, and {reason}; pass one of those"
        )
