"""The first thing to run: LoRA on a real task with a real pretrained model, on a CPU, in minutes.

MiniLM-L6 (shipped in a PyPI package) learns SST-2 sentiment with LoRA; the same backbone frozen
with only a trained classifier on top is the baseline a delta must beat. Both runs print progress;
the end is a table, the saved delta, a learning-curve PNG and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..core import atomic
from .args import add_threads_argument, positive_float, positive_int, set_threads

HELP = "train LoRA on SST-2 with MiniLM-L6 on the CPU and compare with a trained head alone (~8 min)"

# Chosen by measurement on 2 CPU cores (docs/training.md): two epochs of LoRA r=8 on query and value.
# The learning rates are `deltatune train`'s defaults (LoRA's default_lr, TrainConfig.head_lr): one set.
LORA = {"r": 8, "alpha": 16, "targets": ("attn.q", "attn.v")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm-l6", help="the backbone (default: minilm-l6)")
    p.add_argument("--task", default="sst2", help="the task (default: sst2)")
    p.add_argument("--out", default="quickstart", help="folder for the delta, curves and summary (default: quickstart)")
    p.add_argument("--epochs", type=positive_float, default=2.0, help="passes over the training rows (default: 2)")
    p.add_argument(
        "--lr", type=positive_float, default=None, help="LoRA's learning rate (default: LoRA's own, as in train)"
    )
    p.add_argument(
        "--max-train", type=positive_int, default=None, help="train on a subset (faster, lower accuracy; default: all)"
    )
    p.add_argument("--seed", type=int, default=42, help="seed of the heads, data order and subsets (default: 42)")
    add_threads_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ..methods import METHODS
    from ..train.plots import plot_curves
    from ..train.run import RunSpec
    from ..train.run import run as run_spec
    from ..train.trainer import TrainConfig
    from .train import constant_prediction_warning, print_result

    try:  # fail now, not after minutes of training
        import accelerate  # noqa: F401
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"quickstart needs the train extra ({err.name} is missing): pip install -e '.[train]'"
        ) from err
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = set_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    common = {
        "epochs": args.epochs,
        "max_length": 64,
        "batch_size": 32,
        "eval_every": 100,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    specs = [
        RunSpec(
            args.model,
            args.task,
            {"lora": METHODS["lora"](**LORA)},
            train=TrainConfig(lr=args.lr, **common),
            max_train=args.max_train,
            output_dir=out / "lora",
        ),
        RunSpec(
            args.model,
            args.task,
            {},
            train=TrainConfig(**common),
            max_train=args.max_train,
            output_dir=out / "head-only",
        ),
    ]
    print(
        f"deltatune quickstart: {args.model} on {args.task}; LoRA vs the frozen backbone with a trained head; "
        f"{threads} CPU thread(s)\n"
    )
    results = {}
    for spec in specs:
        model, result, task = run_spec(spec)
        print_result(spec.label, result, None)
        if (warning := constant_prediction_warning(model, task, spec)) is not None:
            print(warning)
        results[spec.label] = result
    metric = task.primary_metric
    total = time.perf_counter() - start
    names = {"lora": "LoRA r=8 (q,v) + head", "head": "frozen backbone + head"}
    print(f"\n{'run':<28}{'trainable':>12}{'% of model':>12}{'dev ' + metric:>16}{'train s':>10}")
    for label, r in results.items():
        share = 100 * r.trainable_parameters / r.total_parameters
        print(
            f"{names[label]:<28}{r.trainable_parameters:>12,}{share:>11.3f}%{r.best[metric]:>16.4f}"
            f"{r.train_seconds:>10.0f}"
        )
    png = plot_curves(
        {names[k]: r.history for k, r in results.items()},
        metric,
        out / "learning_curve.png",
        title=f"{args.model} on {task.name}: dev {metric}",
    )
    summary = {k: r.to_dict() for k, r in results.items()} | {
        "total_seconds": total,
        "model": args.model,
        "task": task.name,
    }
    atomic.write_file(out / "summary.json", json.dumps(summary, indent=2, default=str))
    print(f"\ndelta: {out / 'lora' / 'delta-lora'}  curve: {png}  summary: {out / 'summary.json'}")
    print(
        f"total {total / 60:.1f} min. Try: deltatune predict --delta {out / 'lora' / 'delta-lora'} "
        '"a gorgeous, witty, seductive movie"'
    )
    return 0
