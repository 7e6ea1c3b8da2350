"""Train a delta (one method, several combined, the head alone, or full fine-tuning) on a task."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..train.trainer import TrainConfig
from .args import method_configs

HELP = "train a delta on a task (e.g. --model minilm-l6 --task sst2 --method lora)"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm-l6", help="minilm-l6, smollm2-135m, a hub id or a local folder")
    p.add_argument("--task", default="sst2", help="a task of the collection (see `deltatune tasks`) or a folder/file")
    p.add_argument("--method", action="append", help="delta method; repeat to combine methods (default: lora)")
    p.add_argument("--method-arg", action="append", default=[], help="key=value (or method.key=value when combining)")
    p.add_argument("--head-only", action="store_true", help="baseline: frozen backbone, train only the task head")
    p.add_argument("--full", action="store_true", help="baseline: full fine-tuning of every weight")
    p.add_argument("--k-shot", type=int, default=None, help="train on k examples per class (LM-BFF sampling)")
    p.add_argument("--max-train", type=int, default=None, help="train on a random subset of this size")
    p.add_argument("--out", default=None, help="output folder (default runs/<task>-<method>-<model>-s<seed>)")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "progress":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = {"float | None": float, "int | None": int}.get(str(field.type), type(getattr(defaults, field.name)))
        p.add_argument(flag, type=kind, default=getattr(defaults, field.name), help=f"(default: {field.default})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def spec_from_args(args: argparse.Namespace):  # noqa: ANN201
    from ..train.run import RunSpec

    if args.full and (args.method or args.head_only):
        raise ValueError("--full trains every weight; drop --method/--head-only")
    names = [] if (args.full or args.head_only) else (args.method or ["lora"])
    methods = method_configs(names, args.method_arg)
    train = TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "progress"}
    )
    train.progress = not args.quiet
    label = "full" if args.full else ("+".join(methods) or "head")
    model_tag = Path(args.model).name
    out = args.out or f"runs/{Path(str(args.task)).name}-{label}-{model_tag}-s{args.seed}"
    resume = getattr(args, "resume", False)
    return RunSpec(args.model, args.task, methods, args.full, train, args.k_shot, args.max_train, out, resume)


def print_result(label: str, result, out: str | None) -> None:  # noqa: ANN001
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best.items())
    print(f"\n{label}: best dev {best} at step {result.best_step}/{result.steps}")
    share = 100 * result.trainable_parameters / max(result.total_parameters, 1)
    print(
        f"trainable {result.trainable_parameters:,} of {result.total_parameters:,} ({share:.3f}%); "
        f"{result.train_seconds:.0f} s"
    )
    if result.diverged:
        print(f"stopped early: {result.diverged}")
    if out:
        print(f"saved to {out} (delta-*/ holds the delta and head; metrics.jsonl the curve)")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ..train.distributed import is_main_process
    from ..train.run import run as run_spec

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    spec = spec_from_args(args)
    model, result, task = run_spec(spec)
    if not is_main_process():  # under `accelerate launch`, one process reports
        return 1 if result.diverged else 0
    print_result(spec.label, result, str(spec.output_dir))
    if task.type == "generation":
        show_samples(model, task, spec, n=3)
    return 1 if result.diverged else 0


def show_samples(model, task, spec, n: int) -> None:  # noqa: ANN001
    """A metric says how much; a few generations say what: print some next to their references."""
    from ..backbones import load_tokenizer
    from ..train.heads import GenerationHead

    tokenizer = load_tokenizer(spec.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    head = GenerationHead(task, tokenizer, spec.train.max_length, spec.train.max_new_tokens)
    examples = task["dev"][:n]
    for example, generated in zip(examples, head.generate(model, examples), strict=True):
        print(
            f"\nsource:    {example.text}\nreference: {example.references[0] if example.references else example.label}"
            f"\ngenerated: {generated}"
        )
