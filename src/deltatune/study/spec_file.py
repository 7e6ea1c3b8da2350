"""Reading a study spec file (YAML, TOML or JSON) within bounds, before anything is built from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# a spec is a few kilobytes, a few levels deep, and a paper's grid is hundreds of runs: bounds far above
# any real spec, checked before anything is built (a 30 MB file, 5,000 nested brackets or a million
# seeds would otherwise exhaust memory, crash the YAML parser's recursion or queue runs for years)
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32
MAX_SPEC_VALUES = 100_000  # values once YAML aliases are expanded (a "billion laughs" file is tiny)


class SpecError(ValueError):
    """A study spec that cannot run; the message names the field and the fix."""


def _check_size(data: Any) -> None:
    """Depth and number of values of a parsed spec, walked without recursion; stops as soon as one is exceeded."""
    count, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"study spec: nested deeper than {MAX_SPEC_DEPTH} levels; a spec is a few levels deep")
        if count > MAX_SPEC_VALUES:
            raise SpecError(
                f"study spec: more than {MAX_SPEC_VALUES:,} values (YAML aliases expanded); split the study"
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A spec file, parsed within bounds (size, nesting, values) before anything is built from it."""
    import stat

    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise SpecError(f"study spec {path} is not a regular file; pass a .yaml/.toml file")
    if info.st_size > MAX_SPEC_BYTES:
        raise SpecError(
            f"study spec {path} is {info.st_size:,} bytes, more than {MAX_SPEC_BYTES:,}; a spec is a few kilobytes"
        )
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = _toml().loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = _load_yaml(text)
    except RecursionError:
        raise SpecError(f"study spec {path} is nested far deeper than a spec; fix the file") from None
    _check_size(data)
    return data


def _toml() -> Any:
    """The standard library's TOML reader (Python 3.11+), or `tomli`, the same code, on Python 3.10."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise SpecError(
                "reading a .toml spec on Python 3.10 needs tomli (pip install tomli), or write it as .yaml"
            ) from None
    return tomllib


def _load_yaml(text: str) -> Any:
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is in the [study] extra
        raise ImportError("YAML study specs need pyyaml: pip install 'deltatune[study]' (or write TOML)") from err

    class BoundedLoader(yaml.SafeLoader):
        """safe_load whose node composer refuses nesting beyond MAX_SPEC_DEPTH (it recurses per level)."""

        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_SPEC_DEPTH:
                    raise SpecError(
                        f"study spec: nested deeper than {MAX_SPEC_DEPTH} levels; a spec is a few levels deep"
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
