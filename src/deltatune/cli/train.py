"""Train a delta (one method, several combined, the head alone, or full fine-tuning) on a task."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ..train.trainer import FULL_FT_LR, TrainConfig
from . import checks, run_folder
from .args import (
    add_columns_argument,
    add_threads_argument,
    check_max_length,
    fraction,
    method_configs,
    non_negative_float,
    non_negative_int,
    or_none,
    positive_float,
    positive_int,
    seed,
    set_threads,
    unit_interval,
)

HELP = "train a delta on a task (e.g. --model minilm-l6 --task sst2 --method lora)"


def _method_rates() -> str:
    from ..methods import METHODS

    first = sorted(METHODS, key=lambda name: name != "lora")  # the default method first
    rates = ", ".join(f"{name} {METHODS[name].default_lr:g}" for name in first)
    return f"{rates}; --full {FULL_FT_LR:g}"


# What each training setting does and what its default means; a setting added to TrainConfig later
# still gets a flag, with its default as the help.
FIELD_HELP: dict[str, str] = {
    "lr": "learning rate of the delta (default: each method's own rate: {rates})",
    "head_lr": "learning rate of the task head (classifier) (default: %(default)g)",
    "epochs": "at most this many passes over the training rows (default: %(default)s; none: no bound); "
    "the run ends at --epochs or --max-steps, whichever comes first, or earlier by --patience",
    "max_steps": "at most this many optimizer steps (default: %(default)s; none: no bound)",
    "batch_size": "training rows per step (default: %(default)s)",
    "eval_batch_size": "rows per batch when evaluating (default: %(default)s)",
    "max_length": "longest input in tokens; longer inputs are cut (default: %(default)s)",
    "warmup_ratio": "share of the steps over which the learning rate rises from 0 (default: %(default)s)",
    "weight_decay": "AdamW weight decay (default: %(default)s, none)",
    "grad_clip": "clip the gradient norm to this (default: %(default)s)",
    "eval_every": "evaluate on dev every this many steps, and at the end (default: none, about twice an epoch)",
    "patience": "stop after this many dev evaluations without a new best (default: %(default)s; none: never, "
    "train to --epochs/--max-steps)",
    "min_steps": "dev evaluations before this step never count toward --patience (default: %(default)s)",
    "seed": "seed of the head's initialisation, the data order and subsets (default: %(default)s)",
    "grad_accum": "accumulate gradients over this many batches per step (default: %(default)s)",
    "mixed_precision": "no, bf16 or fp16 (default: %(default)s, float32 throughout)",
    "max_eval": "evaluate on at most this many dev rows, a fixed random sample (default: all)",
    "max_new_tokens": "longest generated text, for generation tasks (default: %(default)s)",
    "report_to": "log the run to experiment trackers: tensorboard, wandb, mlflow, trackio, ... (comma-separated, "
    "or all; TensorBoard writes under <out>/logs; default: none)",
}
# The range each numeric setting must be in; others are checked by their type (numbers above 0).
FIELD_TYPE: dict[str, Any] = {
    "warmup_ratio": unit_interval,
    "weight_decay": non_negative_float,
    "seed": seed,
    "min_steps": non_negative_int,
    "mixed_precision": str,
}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="minilm-l6",
        help="minilm-l6 (default), smollm2-135m, a hub id, a local folder or a .gguf file",
    )
    p.add_argument(
        "--task",
        default="sst2",
        help="a task of the collection (see `deltatune tasks`; default: sst2), or your own data: a folder with "
        "train/dev/test .jsonl/.csv/.tsv/.json/.parquet files (or a datasets save_to_disk folder), or a single "
        "such file (README: Your own data)",
    )
    add_columns_argument(p, "those names, or common ones such as sentence/premise")
    p.add_argument(
        "--dev-split",
        type=fraction,
        default=None,
        help="hold out this fraction of train as the dev split (seeded, stratified by class), for data "
        "without one, e.g. --dev-split 0.1 (default: use the task's own dev split)",
    )
    p.add_argument("--method", action="append", help="delta method; repeat to combine methods (default: lora)")
    p.add_argument(
        "--method-arg",
        action="append",
        default=[],
        help="a method setting as key=value, e.g. r=16 (method.key=value when combining; default: the method's own)",
    )
    p.add_argument("--head-only", action="store_true", help="baseline: frozen backbone, train only the task head")
    p.add_argument("--full", action="store_true", help="baseline: full fine-tuning of every weight")
    add_quantize_arguments(p)
    p.add_argument(
        "--k-shot", type=positive_int, default=None, help="train on k rows per class (LM-BFF sampling; default: all)"
    )
    p.add_argument(
        "--max-train", type=positive_int, default=None, help="train on a random subset of this size (default: all)"
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<task>-<method>-<model>-s<seed>)")
    p.add_argument(
        "--no-test",
        action="store_true",
        help="skip scoring the kept delta on the test split (default: scored when the task has one)",
    )
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "progress":
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = FIELD_TYPE.get(field.name) or (
            positive_float if "float" in str(field.type) else positive_int if "int" in str(field.type) else str
        )
        if "None" in str(field.type):  # None means "no bound" / "off": spelled `none` on the command line
            kind = or_none(kind)
        help_text = FIELD_HELP.get(field.name, "(default: %(default)s)").replace("{rates}", _method_rates())
        choices = ["no", "bf16", "fp16"] if field.name == "mixed_precision" else None
        p.add_argument(flag, type=kind, default=default, choices=choices, help=help_text)
    add_threads_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_quantize_arguments(p: argparse.ArgumentParser, eval_help: str | None = None) -> None:
    """--quantize 4bit|8bit, with the names TRL and axolotl users type (--load-in-4bit, --load-in-8bit)."""
    from ..quantization import QUANTIZE

    group = p.add_mutually_exclusive_group()
    choices = [*QUANTIZE, "none"] if eval_help else list(QUANTIZE)
    group.add_argument(
        "--quantize",
        choices=choices,
        default=None,
        help=eval_help
        or "load the backbone quantized by bitsandbytes and train the delta on it (QLoRA: 4bit is NF4 with double "
        "quantization; 8bit is LLM.int8()); the head stays unquantized (default: full precision)",
    )
    group.add_argument("--load-in-4bit", dest="quantize", action="store_const", const="4bit", help="--quantize 4bit")
    group.add_argument("--load-in-8bit", dest="quantize", action="store_const", const="8bit", help="--quantize 8bit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (default: a folder holding a run is refused, not overwritten)",
    )


def load_task_for_run(args: argparse.Namespace):  # noqa: ANN201
    """The task, with a dev split held out when asked; refuses data without dev before any model loads."""
    from ..data.split import hold_out_dev
    from ..data.tasks import load_task

    task = load_task(args.task, columns=args.columns)
    if args.dev_split is not None and "dev" in task.splits:
        raise ValueError(
            f"task {task.name!r} has a dev split already ({len(task.splits['dev'])} rows); drop --dev-split"
        )
    if args.dev_split is None and "dev" not in task.splits:
        raise ValueError(
            f"task {task.name!r} has no dev split (it has {', '.join(task.splits)}) to pick the best checkpoint "
            "by; add --dev-split 0.1 to hold out 10% of train (seeded, stratified by class)"
        )
    if task.type in ("classification", "pair_classification") and len(task.labels) < 2:
        raise ValueError(
            f"task {task.name!r} has one class only ({task.labels!r}): there is nothing to tell apart; check the "
            "label column, or list the classes in meta.json"
        )
    return hold_out_dev(task, args.dev_split) if args.dev_split is not None else task


def spec_from_args(args: argparse.Namespace, task: Any = None):  # noqa: ANN201
    from ..train.run import RunSpec

    if args.full and (args.method or args.head_only):
        raise ValueError("--full trains every weight; drop --method/--head-only")
    if args.full and args.quantize:
        raise ValueError(
            f"--full trains every weight, which a {args.quantize} quantized backbone cannot hold; drop --quantize, "
            "or train a delta on it (--method lora)"
        )
    if args.head_only and args.method:
        raise ValueError("--head-only trains the head alone; drop --method (or --head-only)")
    names = [] if (args.full or args.head_only) else (args.method or ["lora"])
    if not names and args.method_arg:
        raise ValueError(f"--method-arg sets a delta method, and {'--full' if args.full else '--head-only'} has none")
    methods = method_configs(names, args.method_arg)
    train = TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "progress"}
    )
    train.progress = not args.quiet
    from ..train.tracking import parse

    parse(train.report_to)  # a tracker not installed is refused before the model loads, not after
    label = "full" if args.full else ("+".join(methods) or "head")
    model_tag = Path(args.model).name
    out = args.out or f"runs/{Path(str(args.task)).stem}-{label}-{model_tag}-s{args.seed}"
    return RunSpec(
        args.model,
        task if task is not None else args.task,
        methods,
        args.full,
        train,
        args.k_shot,
        args.max_train,
        out,
        resume=getattr(args, "resume", False),
        dev_split=None if task is not None else getattr(args, "dev_split", None),  # a loaded task is split already
        test=not getattr(args, "no_test", False),
        quantize=args.quantize,
    )


def _scores(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def print_result(label: str, result, out: str | None) -> None:  # noqa: ANN001
    print(f"\n{label}: best dev {_scores(result.best)} at step {result.best_step}/{result.steps}")
    if getattr(result, "test", None):
        print(f"{label}: test {_scores(result.test)} (the best dev checkpoint)")
    share = 100 * result.trainable_parameters / max(result.total_parameters, 1)
    print(
        f"trainable {result.trainable_parameters:,} of {result.total_parameters:,} ({share:.3f}%); "
        f"{result.train_seconds:.0f} s"
    )
    if result.diverged:
        print(f"stopped early: {result.diverged}")
    if out:
        saved = sorted(p.name for p in Path(out).glob("delta-*"))
        if saved:
            what = ", ".join(f"{name}/" for name in saved) + " (delta and task head, with the training settings)"
        else:
            what = "model/ (the whole fine-tuned model: transformers' from_pretrained loads it)"
        print(f"saved to {out}: {what}; metrics.jsonl the curve")
        if saved:
            delta = Path(out) / saved[0]
            split = " --split test" if getattr(result, "test", None) else ""
            print(f'next: deltatune eval --delta {delta}{split}   |   deltatune predict --delta {delta} "a text"')


def constant_prediction_warning(model, task, spec) -> str | None:  # noqa: ANN001
    """A warning when every dev prediction is one class: the run learned nothing beyond a constant.

    The metric alone hides it (on a skewed dev set the majority class scores well), and the usual
    cause is a learning rate too low for the steps given.
    """
    from ..backbones import load_tokenizer
    from ..train.evaluation import eval_sample, predict
    from ..train.objectives import has_lm_head, objective_for

    if task.type not in ("classification", "pair_classification") or len(task.labels) < 2:
        return None
    tokenizer = load_tokenizer(spec.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    objective = objective_for(task, tokenizer, lm=has_lm_head(model), max_length=spec.train.max_length)
    dev = eval_sample(list(task["dev"]), spec.train.max_eval)
    predictions = predict(model, objective, dev, spec.train.eval_batch_size)
    if len(set(predictions)) != 1:
        return None
    only = task.labels[predictions[0]]
    rates = [spec.train.lr or type(config).default_lr for config in spec.methods.values()]
    rate = f"--lr (now {max(rates):g}), " if rates else ""
    return (
        f"warning: all {len(dev)} dev predictions are {only!r}: the run learned one class only. "
        f"Try a higher {rate}--head-lr (now {spec.train.head_lr:g}) or more --epochs; "
        "check the classes are not too unbalanced"
    )


def _split_size(split: str, rows: list, spec: Any, task: Any) -> str:
    """'train 64 of 6920' when --max-train or --k-shot trains on part of it, 'dev 500 of 872 per evaluation'."""
    from ..train.run import training_examples

    if split == "train" and (spec.max_train is not None or spec.k_shot is not None):
        used = len(training_examples(task, spec.k_shot, spec.max_train, spec.train.seed))
        return f"train {used} of {len(rows)}" if used != len(rows) else f"train {used}"
    if split == "dev" and spec.train.max_eval is not None and spec.train.max_eval < len(rows):
        return f"dev {spec.train.max_eval} of {len(rows)} per evaluation"
    return f"{split} {len(rows)}"


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from ..train.distributed import is_main_process

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    checks.out_folder(args.out, "--out")
    threads = set_threads(args.threads)
    task = load_task_for_run(args)
    if args.max_length != TrainConfig.max_length:  # a length asked for (the default suits short texts)
        check_max_length(args.model, args.max_length)
    spec = spec_from_args(args, task)
    sizes = ", ".join(_split_size(k, v, spec, task) for k, v in task.splits.items())
    held = f"; dev = {args.dev_split:g} of train, seeded and stratified" if args.dev_split else ""
    release = run_folder.claim(Path(spec.output_dir), spec.resume, args.overwrite, is_main_process())
    try:
        if is_main_process():
            print(f"{spec.label} on {task.name} ({sizes}{held}) with {args.model}; {threads} CPU thread(s)")
        return _train_and_report(spec)
    finally:
        release()


def _train_and_report(spec: Any) -> int:
    from ..data.split import overlap_note
    from ..train.distributed import is_main_process
    from ..train.run import run as run_spec

    model, result, task = run_spec(spec)
    # every process predicts its share of dev (predict gathers them): one process alone waited forever
    # for the others, which had returned, and the launch failed after a successful run
    warning = constant_prediction_warning(model, task, spec) if task.type != "generation" else None
    if not is_main_process():  # under `accelerate launch`, one process reports
        return 1 if result.diverged else 0
    if spec.full_finetune:
        save_full_model(model, task, spec)
    print_result(spec.label, result, str(spec.output_dir))
    if (note := overlap_note(task)) is not None:  # beside the scores it qualifies
        print(note, file=sys.stderr)
    if task.type == "generation":
        show_samples(model, task, spec, n=3)  # no collective: the main process alone generates
    elif warning is not None:
        print(warning)
    return 1 if result.diverged else 0


def save_full_model(model, task, spec) -> None:  # noqa: ANN001
    """Full fine-tuning has no delta: its result is the whole model, saved as a transformers folder (`model/`,
    at the best dev step, with the task's label names and the tokenizer). It was not saved at all, while the
    run said "saved to ... (delta and task head)"."""
    from ..backbones import load_tokenizer
    from ..core import atomic
    from ..train.saved import set_label_names

    set_label_names(model, task.labels)
    with atomic.replacing_folder(Path(spec.output_dir) / "model") as tmp:
        getattr(model, "backbone", model).save_pretrained(tmp)
        load_tokenizer(spec.model).save_pretrained(tmp)


def show_samples(model, task, spec, n: int) -> None:  # noqa: ANN001
    """A metric says how much; a few generations say what: print some next to their references."""
    from ..backbones import load_tokenizer
    from ..train.objectives import GenerationObjective

    tokenizer = load_tokenizer(spec.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    objective = GenerationObjective(task, tokenizer, spec.train.max_length, spec.train.max_new_tokens)
    examples = task["dev"][:n]
    for example, generated in zip(examples, objective.generate(model, examples), strict=True):
        print(
            f"\nsource:    {example.text}\nreference: {example.references[0] if example.references else example.label}"
            f"\ngenerated: {generated}"
        )
