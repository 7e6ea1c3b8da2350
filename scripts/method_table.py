"""Regenerate the README's method table: family, what it trains, defaults, counts on real backbones.

    python scripts/method_table.py            # print the table
    python scripts/method_table.py --write    # replace the table between the README's markers

Counts come from attaching each method with its defaults to MiniLM-L6 (classification head) and
SmolLM2-135M (causal LM) and counting the delta's own parameters (task heads excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

import deltatune as dt
from deltatune.backbones import load_backbone
from deltatune.core import atomic

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
BACKBONES = [("minilm-l6", "cls", "MiniLM-L6 (22.7M)"), ("smollm2-135m", "causal-lm", "SmolLM2-135M (134.5M)")]


def defaults(config: dt.DeltaConfig) -> str:
    parts = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        parts.append(f"{field.name}={value}")
    return "<br>".join(parts)


def counts() -> dict[str, dict[str, int | str]]:
    table: dict[str, dict[str, int | str]] = {m: {} for m in dt.METHODS}
    for name, head, _ in BACKBONES:
        model = load_backbone(name, head)
        for method in dt.METHODS:
            try:
                dm = dt.attach(model, dt.METHODS[method]())
                table[method][name] = dm.delta_parameters()
                dm.detach()
            except (ValueError, RuntimeError) as err:
                table[method][name] = f"n/a ({err})"
        del model
    return table


def render() -> str:
    numbers = counts()
    head = "| method | family | trains | defaults | " + " | ".join(b[2] for b in BACKBONES) + " | mergeable |"
    lines = [head, "|" + "---|" * (5 + len(BACKBONES))]
    for method, cls in dt.METHODS.items():
        config = cls()
        cells = []
        for name, _, _ in BACKBONES:
            n = numbers[method][name]
            cells.append(f"{n:,}" if isinstance(n, int) else str(n))
        merge = "yes" if config.can_merge else (f"with {cls.merge_requires}" if cls.merge_requires else "no")
        lines.append(
            f"| `{method}` | {config.family} | {config.trains} | {defaults(config)} | "
            + " | ".join(cells)
            + f" | {merge} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    table = render()
    if not args.write:
        print(table)
        return 0
    text = README.read_text()
    if START not in text or END not in text:
        print(f"README.md lacks the markers {START} ... {END}", file=sys.stderr)
        return 1
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table}\n{END}", text, flags=re.S)
    atomic.write_file(README, new)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
