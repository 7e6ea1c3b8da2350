"""delta.json's own seal and the bounded reads every delta file goes through.

A delta.json records a SHA-256 of its own content (`meta_sha256`), so that an edit that still parses
(alpha 16 -> 32: the same tensors, other outputs) is refused instead of silently changing outputs.
Files are read only when they are regular and within a size bound: a FIFO would block forever and
/dev/zero never ends. Split from `core.io`, which imports these names.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from .delta import DeltaIOError

META = "delta.json"
_MAX_META_BYTES = 8 << 20  # a delta.json is kilobytes; anything this large is not one
_MAX_DEPTH = 32  # nesting of delta.json; deeper is not something deltatune wrote
_warned_unsealed = False
SEAL = "meta_sha256"


def _digest(meta: dict[str, Any]) -> str:
    """SHA-256 of delta.json's content without its seal, in one canonical spelling (key order, spacing)."""
    body = {k: v for k, v in meta.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sealed(meta: dict[str, Any]) -> bytes:
    """delta.json's bytes, with the seal computed over what loading will parse (JSON turns tuples into lists)."""
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != SEAL}, separators=(",", ":")))
    return json.dumps({**plain, SEAL: _digest(plain)}, separators=(",", ":")).encode()


def _read_regular(file: Path, limit: int | None, what: str) -> bytes:
    """A regular file's bytes, at most `limit`: a FIFO would block forever and /dev/zero never ends."""
    try:
        info = file.stat()
    except OSError as err:
        raise DeltaIOError(f"{file} cannot be read ({err.strerror or err}); {what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DeltaIOError(f"{file} is not a regular file (a device, pipe or folder); {what}")
    if limit is not None and info.st_size > limit:
        raise DeltaIOError(
            f"{file} is {info.st_size:,} bytes, far more than a delta description; was it edited or replaced?"
        )
    with open(file, "rb") as f:
        return f.read(info.st_size + 1 if limit is None else limit + 1)


def check_seal(path: str | os.PathLike) -> None:
    """Refuse a delta.json edited since it was saved (an edit that still parses would change outputs silently)."""
    global _warned_unsealed
    file = Path(path) / META
    meta = json.loads(_read_regular(file, _MAX_META_BYTES, "save the delta again").decode("utf-8"))
    expected = meta.get(SEAL)
    if expected is None:
        if not _warned_unsealed:
            _warned_unsealed = True
            warnings.warn(
                f"{file} records no hash of its own content (written before deltatune sealed it), so an edit cannot be "
                f"detected; run `deltatune reseal {path}` or save the delta again to add one",
                stacklevel=3,
            )
        return
    if expected != _digest(meta):
        raise DeltaIOError(
            f"{file} is edited or corrupted: its content does not match the SHA-256 recorded when it was saved; "
            f"restore it or save the delta again (if you edited it on purpose: deltatune reseal {path})"
        )


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest
