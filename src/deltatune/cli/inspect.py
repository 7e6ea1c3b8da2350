"""Show a backbone's module tree with a delta's sites marked, and what every method would train on it."""

from __future__ import annotations

import argparse
import time

from transformers.utils import logging as transformers_logging

from ..core.entry import attach
from ..core.model import DeltaModel
from ..methods import METHODS
from .args import method_config, positive_int

HELP = "model tree with deltas marked and each method's parameter count"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", nargs="?", help="a saved delta folder to describe (instead of a model tree)")
    p.add_argument(
        "--model",
        default="minilm-l6",
        help="short name (minilm-l6, smollm2-135m), hub id or folder (default: minilm-l6)",
    )
    p.add_argument(
        "--head", default=None, help="the head to load: cls or causal-lm (default: causal-lm for SmolLM2, else cls)"
    )
    p.add_argument("--method", action="append", help="method(s) to attach and mark in the tree (default: lora)")
    p.add_argument(
        "--method-arg",
        action="append",
        default=[],
        help="a setting of the (single) method as key=value, e.g. r=16 (default: the method's own)",
    )
    p.add_argument("--depth", type=positive_int, default=8, help="deepest level of the tree to print (default: 8)")
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
                "mergeable": config.can_merge,
            }
        )
    return rows


def describe_delta(path: str) -> str:
    """What a delta folder holds and how it was trained, read from its JSON and file sizes (no model loads)."""
    from pathlib import Path

    from ..core.io import META, WEIGHTS
    from ..train.saved import is_head_only
    from .evaluate import saved_meta

    meta = saved_meta(path, flag="")
    config = dict(meta["config"])
    method = config.pop("method")
    backbone = meta.get("backbone", {})
    size = (Path(path) / WEIGHTS).stat().st_size if (Path(path) / WEIGHTS).exists() else 0
    head = f" + task head {meta['head_parameters']:,}" if meta.get("head_parameters") else ""
    if is_head_only(meta):
        lines = [f"head-only run {meta.get('name')!r}: frozen backbone, task head {meta.get('head_parameters', 0):,}"]
    else:
        lines = [
            f"delta {meta.get('name')!r}: {method} ({meta.get('family')}), "
            f"{meta.get('num_parameters', 0):,} parameters{head}",
            "config: " + ", ".join(f"{k}={v}" for k, v in config.items()),
            f"sits on {len(meta.get('sites', {}))} modules, e.g. {', '.join(list(meta.get('sites', {}))[:3])}",
        ]
    lines += [
        f"backbone: {backbone.get('class')} ({backbone.get('model_type')}), {backbone.get('num_parameters', 0):,} "
        f"parameters, {', '.join(backbone.get('dtypes', []))}, from {backbone.get('name_or_path')}",
        f"files: {WEIGHTS} {size:,} bytes, {META} {(Path(path) / META).stat().st_size:,} bytes",
        f"saved {meta.get('saved_at')} by deltatune {meta.get('deltatune_version')}",
    ]
    info = dict(meta.get("metadata") or {})
    return "\n".join(lines + _training_lines(info))


def _integrity(path: str) -> str:
    """The check loading makes (tensor SHA-256, delta.json seal): inspecting a corrupted delta must say so."""
    import warnings

    from ..core.io import read_tensors

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_tensors(path)  # raises DeltaIOError naming the corrupted or edited file
    old = f" ({'; '.join(str(w.message).split(',')[0] for w in caught)})" if caught else ""
    return f"integrity: ok{old}" if not caught else f"integrity: unverified{old}"


def _scores(metrics: dict | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items())


def _training_lines(info: dict) -> list[str]:
    """The run behind a delta: data, scores and every training setting `deltatune train` recorded."""
    if not info:
        return []
    lines = []
    if "task" in info:
        labels = info.get("labels") or []
        lines.append(
            f"task: {info['task']} ({info.get('task_type')}"
            + (f", labels {', '.join(labels)}" if labels else "")
            + (", text pairs" if info.get("pairs") else "")
            + ")"
            + (f" from {info['task_source']}" if info.get("task_source") else "")
        )
    if info.get("dev_split"):
        held = info["dev_split"]
        lines.append(
            f"dev split: {held['dev']} rows held out of train ({held['fraction']:g}, seed {held['seed']}"
            + (", stratified" if held.get("stratified") else "")
            + f"), {held['train']} left to train on"
        )
    if info.get("best"):
        lines.append(f"best dev: {_scores(info['best'])} at step {info.get('best_step')}")
    if info.get("test"):
        lines.append(f"test: {_scores(info['test'])}")
    run = {k: info[k] for k in ("model", "mode", "k_shot", "max_train") if info.get(k) is not None}
    if run:
        lines.append("run: " + ", ".join(f"{k}={v}" for k, v in run.items()))
    if info.get("rates"):
        lines.append("learning rates: " + ", ".join(f"{k} {v:g}" for k, v in info["rates"].items()))
    if info.get("train"):
        lines.append("training: " + ", ".join(f"{k}={v}" for k, v in info["train"].items()))
    shown = {"task", "labels", "task_type", "pairs", "task_source", "dev_split", "best", "best_step", "test"}
    shown |= {"train", "rates"}
    rest = {k: v for k, v in info.items() if k not in shown and k not in run and v is not None}
    if rest:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in rest.items()))
    return lines


def run(args: argparse.Namespace) -> int:
    from ..backbones import load_backbone

    if args.delta:
        print(describe_delta(args.delta))
        print(_integrity(args.delta))  # after the description, so a corrupted delta is still described
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


HELP_RESEAL = "accept a deliberately edited delta.json: check it as loading does and record its new hash"


def add_reseal_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("delta", help="a delta folder whose delta.json you edited on purpose")


def run_reseal(args: argparse.Namespace) -> int:
    from ..core.io import reseal

    reseal(args.delta)
    print(f"resealed {args.delta}: its delta.json, as it is now, is what loading will accept")
    return 0
