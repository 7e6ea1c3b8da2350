"""Show a backbone's module tree with a delta's sites marked, and what every method would train on it."""

from __future__ import annotations

import argparse
import time

from transformers.utils import logging as transformers_logging

from ..core.model import DeltaModel, attach
from ..methods import METHODS
from .args import method_config

HELP = "model tree with deltas marked and each method's parameter count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", nargs="?", help="a saved delta folder to describe (instead of a model tree)")
    p.add_argument("--model", default="minilm-l6", help="short name (minilm-l6, smollm2-135m), hub id or folder")
    p.add_argument("--head", default=None, help="cls (default for encoders) or causal-lm (default for decoders)")
    p.add_argument("--method", action="append", help="method(s) to attach and mark in the tree (default: lora)")
    p.add_argument("--method-arg", action="append", default=[], help="key=value for the (single) method")
    p.add_argument("--depth", type=int, default=8, help="deepest level of the tree to print")
    p.add_argument("--no-table", action="store_true", help="skip the table of every method's parameter count")


def method_table(model, methods: list[str] | None = None) -> list[dict[str, object]]:  # noqa: ANN001
    """Attach each method with its defaults in turn, count what it trains, and detach it again."""
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for name in methods or list(METHODS):
        config = METHODS[name]()
        try:
            dm = attach(model, config)
            count = dm.delta_parameters()
            dm.detach()
        except (ValueError, RuntimeError) as err:
            rows.append({"method": name, "family": config.family, "params": None, "note": str(err)})
            continue
        rows.append(
            {
                "method": name,
                "family": config.family,
                "trains": config.trains,
                "params": count,
                "percent": 100.0 * count / total,
                "mergeable": config.mergeable,
            }
        )
    return rows


def describe_delta(path: str) -> str:
    """What a delta folder holds, read from its JSON and file sizes alone (no model is loaded)."""
    from pathlib import Path

    from ..core.io import META, WEIGHTS, read_meta

    meta = read_meta(path)
    config = dict(meta["config"])
    method = config.pop("method")
    backbone = meta.get("backbone", {})
    size = (Path(path) / WEIGHTS).stat().st_size if (Path(path) / WEIGHTS).exists() else 0
    lines = [
        f"delta {meta.get('name')!r}: {method} ({meta.get('family')}), {meta.get('num_parameters', 0):,} parameters"
        + (f" + task head {meta['head_parameters']:,}" if meta.get("head_parameters") else ""),
        "config: " + ", ".join(f"{k}={v}" for k, v in config.items()),
        f"sits on {len(meta.get('sites', {}))} modules, e.g. {', '.join(list(meta.get('sites', {}))[:3])}",
        f"backbone: {backbone.get('class')} ({backbone.get('model_type')}), {backbone.get('num_parameters', 0):,} "
        f"parameters, {', '.join(backbone.get('dtypes', []))}, from {backbone.get('name_or_path')}",
        f"files: {WEIGHTS} {size:,} bytes, {META} {(Path(path) / META).stat().st_size:,} bytes",
        f"saved {meta.get('saved_at')} by deltatune {meta.get('deltatune_version')}",
    ]
    info = meta.get("metadata") or {}
    if info:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "labels"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..backbones import load_backbone

    if args.delta:
        print(describe_delta(args.delta))
        return 0

    start = time.perf_counter()
    head = args.head or ("causal-lm" if "smollm" in args.model else "cls")
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()  # the "classifier newly initialized" report is expected here
    model = load_backbone(args.model, head)
    print(f"loaded {args.model} ({type(model).__name__}) in {time.perf_counter() - start:.1f} s\n")
    names = args.method or ["lora"]
    if len(names) > 1 and args.method_arg:
        raise ValueError("--method-arg applies to a single --method; attach one method to set its arguments")
    dm: DeltaModel | None = None
    for i, name in enumerate(names):
        config = method_config(name, args.method_arg)
        dm = attach(model if dm is None else dm, config, name=name if len(names) > 1 else "default")
        del i
    assert dm is not None
    print(dm.tree(max_depth=args.depth))
    backbone = dm.detach()
    if not args.no_table:
        print(f"\nevery method with its defaults on {args.model}:")
        print(f"{'method':<17}{'family':<20}{'trainable':>12}{'% of model':>12}  mergeable")
        for row in method_table(backbone):
            if row["params"] is None:
                print(f"{row['method']:<17}{row['family']:<20}{'-':>12}{'':>12}  ({row['note']})")
            else:
                merge = "yes" if row["mergeable"] else "no"
                print(f"{row['method']:<17}{row['family']:<20}{row['params']:>12,}{row['percent']:>11.3f}%  {merge}")
    return 0
