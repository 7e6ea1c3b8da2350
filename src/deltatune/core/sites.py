"""Module names in delta.json, compacted: `a.{0-29}.b` for thirty layers that differ only in the index.

Reading is bounded: the ranges are counted before any is expanded, so an edited file naming a
billion layers is refused, not allocated.
"""

from __future__ import annotations

import re
from typing import Any

from .delta import DeltaIOError

_MAX_SITES = 1 << 20  # modules a delta may name once layer ranges are expanded

_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")
_RANGE = re.compile(r"\{(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)\}")


def compact_sites(sites: dict[str, int]) -> dict[str, int]:
    """Sites that differ only in their first index (the layer) and count the same, as one `a.{0-29}.b` key.

    A delta on a 30-layer model otherwise spends kilobytes of delta.json repeating module names
    (SmolLM2's LoRA: 60 names), which is what kept its folder above the tensors + 16 KiB target.
    """
    groups: dict[tuple[str, int], list[int]] = {}
    out: dict[str, int] = {}
    for name, count in sites.items():
        match = None if "{" in name else _INDEX.search(name)
        if match is None:
            out[name] = count
            continue
        template = name[: match.start()] + "{}" + name[match.end() :]
        groups.setdefault((template, count), []).append(int(match.group(1)))
    for (template, count), indices in groups.items():
        out[template.replace("{}", "{" + _ranges(indices) + "}", 1)] = count
    return out


def expand_sites(sites: dict[str, int]) -> dict[str, int]:
    """The inverse of `compact_sites` (plain names, as older delta.json files store them, pass through).

    The ranges are counted before any is expanded: `a.{0-99999999}.b` is refused, not allocated.
    """
    parsed: list[tuple[str, Any, list[tuple[int, int]]]] = []
    total = 0
    for key, count in sites.items():
        match = _RANGE.search(key) if isinstance(key, str) and len(key) <= 1024 else None
        if match is None:
            parsed.append((key, count, []))
            total += 1
            continue
        spans = []
        for part in match.group(1).split(","):
            lo, _, hi = part.partition("-")
            if len(lo) > 7 or len(hi) > 7 or int(hi or lo) < int(lo):
                raise DeltaIOError(f"delta.json names modules with a layer range {part!r} no model has; was it edited?")
            spans.append((int(lo), int(hi or lo)))
            total += int(hi or lo) - int(lo) + 1
        parsed.append((key, count, spans))
        if total > _MAX_SITES:
            raise DeltaIOError(f"delta.json names more than {_MAX_SITES:,} modules; was it edited?")
    out: dict[str, int] = {}
    for key, count, spans in parsed:
        if not spans:
            out[key] = count
            continue
        match = _RANGE.search(key)
        for lo, hi in spans:
            for i in range(lo, hi + 1):
                out[key[: match.start()] + str(i) + key[match.end() :]] = count
    return out


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = ordered[0]
    for i in [*ordered[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)
