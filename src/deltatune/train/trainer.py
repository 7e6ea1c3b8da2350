"""The training loop: AdamW over the trainable tensors only, on accelerate, keeping the best delta.

One loop serves delta tuning (any set of methods on one backbone, each parameter group at its
method's learning rate), head-only training (a frozen backbone, the baseline every delta must beat)
and full fine-tuning (the other baseline). accelerate places the model on a GPU when there is one,
handles bf16 and gradient accumulation, and spreads the run over processes under `accelerate launch`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import atomic
from ..core.delta import Delta, DeltaConfig
from ..core.layers import numel
from ..core.model import DeltaModel
from ..data.tasks import Example, Task
from . import checkpoint, tracking
from .distributed import global_mean, make_accelerator
from .evaluation import eval_sample, evaluate, majority_metrics
from .objectives import has_lm_head, objective_for
from .optim import DEFAULT_HEAD_LR, adamw, param_groups

FULL_FT_LR = 5e-5


STOP_REASONS = ("patience", "max_steps", "max_epochs", "diverged")
RUN_ONLY = ("progress", "report_to")  # how a run shows itself, not what it trains: a resume may change them


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite; the parameters from before that step were kept."""


@dataclasses.dataclass
class TrainConfig:
    """How one run trains. The default budget is "until converged", not a number of epochs.

    Dev is evaluated every `eval_every` optimizer steps (by default about twice an epoch, see
    auto_eval_every); the run stops after `patience` evaluations without a new best, where
    evaluations before `min_steps` do not count, and in any case at `max_steps` steps or `epochs`
    passes, whichever comes first. The delta at its best evaluation is kept, and TrainResult says
    which rule ended the run (`stop_reason`). A fixed budget: `patience=None` with `max_steps` or
    `epochs` (the other None). A small data set so gets many passes (20 epochs of 900 examples are
    580 steps at batch 32) and a large one is bounded by steps, instead of both getting 3 epochs.
    """

    lr: float | None = None  # None: each method's default_lr (FULL_FT_LR for full fine-tuning)
    head_lr: float = DEFAULT_HEAD_LR  # the rate `hf.optimizer` gives the head too: one default
    # -- the budget: train until dev stops improving, within two bounds (whichever comes first)
    epochs: float | None = 20.0  # at most this many passes over the training set (None: no bound)
    max_steps: int | None = 3000  # at most this many optimizer steps (None: no bound)
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int | None = None  # steps between dev evaluations (and one at the end); None: auto_eval_every
    patience: int | None = 5  # stop after this many evaluations without improvement (None: run the bounds out)
    min_steps: int = 200  # evaluations before this step never count toward patience (a slow start is not a plateau)
    seed: int = 42
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no", "bf16", "fp16"
    max_eval: int | None = None  # cap on dev examples per evaluation
    max_new_tokens: int = 48
    progress: bool = True
    report_to: str | None = None  # trackers: "tensorboard", "wandb", "mlflow", ... comma-separated (train/tracking.py)


@dataclasses.dataclass
class TrainResult:
    best: dict[str, float]
    best_step: int
    history: list[dict[str, Any]]
    steps: int
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    mode: str
    diverged: str | None = None
    stop_reason: str = "max_steps"  # patience, max_steps, max_epochs or diverged (STOP_REASONS)
    majority: dict[str, float] | None = None  # dev metrics of always predicting the most frequent dev label
    test: dict[str, float] | None = None  # the kept (best dev) state scored on test, when asked

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _param_groups(model: nn.Module, dm: DeltaModel | None, cfg: TrainConfig) -> list[dict[str, Any]]:
    if dm is None:  # full fine-tuning
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr or FULL_FT_LR}]
    return param_groups(dm, cfg.lr, cfg.head_lr)


def auto_eval_every(steps_per_epoch: int, dev_size: int = 0, batch_size: int = 32) -> int:
    """About two dev evaluations per epoch, but no more often than one per dev set's worth of
    training examples; at least every 200 and at most every 10 steps.

    Often enough that patience sees a plateau within a few epochs on a small set. An evaluation
    (forward only) costs about a third of training on as many examples, so training at least
    `dev_size` examples between evaluations keeps them under a quarter of the run: a 900-example
    training set with a 1,100-example dev set would otherwise spend half its time evaluating.
    """
    return max(10, min(200, max(steps_per_epoch // 2, math.ceil(dev_size / batch_size))))


def step_budget(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, str]:
    """The most optimizer steps this run may take and the bound that sets it (max_steps or max_epochs)."""
    bounds = []
    if cfg.max_steps is not None:
        bounds.append((cfg.max_steps, "max_steps"))
    if cfg.epochs is not None:
        bounds.append((max(1, math.ceil(cfg.epochs * steps_per_epoch)), "max_epochs"))
    if not bounds:
        raise ValueError("the run has no bound: set max_steps or epochs (patience alone may never stop it)")
    return min(bounds, key=lambda b: b[0])


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _settings(cfg: TrainConfig, dm: DeltaModel | None, task: Task, n_train: int, n_dev: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (JSON, as it is stored)."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    deltas = {n: d.config.to_dict() for n, d in dm.deltas.items()} if dm is not None else None
    info = {"train": train, "deltas": deltas, "task": task.name, "labels": task.labels, "examples": [n_train, n_dev]}
    return json.loads(json.dumps(info, default=str))


def fit(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    methods: Sequence[DeltaConfig] | dict[str, DeltaConfig] = (),
    cfg: TrainConfig | None = None,
    *,
    full_finetune: bool = False,
    train_head: bool = True,
    output_dir: str | os.PathLike | None = None,
    train_examples: Sequence[Example] | None = None,
    dev_examples: Sequence[Example] | None = None,
    resume: bool = False,
    test_examples: Sequence[Example] | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Train deltas (or the head alone, or everything) on a task; return the model at its best dev score.

    A delta run with an `output_dir` keeps `<output_dir>/checkpoint/` current at every evaluation;
    `resume=True` continues from it to what the uninterrupted run would reach (train/checkpoint.py).
    With `test_examples`, the kept state is scored on them once (`result.test`); `metadata` is
    stored with the saved delta beside the task and every training setting.
    """
    from accelerate.utils import set_seed

    cfg = cfg or TrainConfig()
    set_seed(cfg.seed)
    backbone = model.backbone if isinstance(model, DeltaModel) else model
    if getattr(backbone.config, "is_encoder_decoder", False):
        raise ValueError(
            "training encoder-decoder backbones (T5, BART) is not supported yet; use an encoder or a causal LM"
        )
    lm = has_lm_head(backbone)
    objective = objective_for(task, tokenizer, lm=lm, max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens)
    named = methods if isinstance(methods, dict) else {c.method: c for c in methods}
    if full_finetune and named:
        raise ValueError("full fine-tuning trains every weight; drop the delta methods or drop full_finetune")
    dm: DeltaModel | None = None
    if full_finetune:
        mode = "full"
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        dm = model if isinstance(model, DeltaModel) else DeltaModel(model)
        for name, config in named.items():
            dm.add(name, config)
        dm.freeze(train_head=train_head and objective.kind != "lm-gen" and not lm)
        mode = "+".join(dm.deltas) or "head"
        model = dm
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        if lm or objective.kind == "lm-gen":  # --head-only on a causal LM: it has no classifier head to train
            raise ValueError(
                "nothing to train: this model scores through its language-model head, which stays frozen (a head-only "
                "run trains a classifier head, which it has none of); attach a delta method (e.g. --method lora) or "
                "use full fine-tuning"
            )
        raise ValueError("nothing to train: attach a delta method, train the head, or use full fine-tuning")
    total = sum(numel(p) for p in (dm.backbone if dm is not None else model).parameters())  # 4-bit: as numbers

    train = list(train_examples if train_examples is not None else task["train"])
    dev = eval_sample(list(dev_examples if dev_examples is not None else task["dev"]), cfg.max_eval)
    settings = _settings(cfg, dm, task, len(train), len(dev)) | checkpoint.provenance(backbone, train, dev)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        train, batch_size=cfg.batch_size, shuffle=True, collate_fn=objective.collate, generator=generator
    )
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    max_steps, bound = step_budget(cfg, steps_per_epoch)
    eval_every = cfg.eval_every or auto_eval_every(steps_per_epoch, len(dev), cfg.batch_size)
    optimizer = adamw(_param_groups(model, dm, cfg), weight_decay=cfg.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * max_steps), max_steps)
    trackers = tracking.parse(cfg.report_to)
    logs = tracking.logging_dir(output_dir, trackers)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.batch_size, trackers, logs)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    resume_dir = Path(output_dir) if resume and output_dir is not None else None
    if resume and resume_dir is None:
        raise ValueError("resume=True continues the run saved in output_dir; pass the output_dir it was started with")
    if resume_dir is not None:  # read and checked before anything is written: a refusal leaves the run as it was
        tensors, saved = checkpoint.load(resume_dir)
        checkpoint.check_same_settings(saved["loop"].get("settings"), settings, resume_dir)
    if not accelerator.is_main_process:  # the main process alone prints and writes
        cfg, output_dir = dataclasses.replace(cfg, progress=False), None

    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    run_name = Path(output_dir).name if output_dir is not None else f"{task.name}-{mode}"
    tracking.start(accelerator, trackers, run_name, {**settings, "mode": mode, "trainable": trainable})
    history: list[dict[str, Any]] = []
    primary = task.primary_metric
    # until a first evaluation, the "best" state is the starting one: a run that diverges early keeps it
    best, best_step, best_state, stale = {primary: -math.inf}, 0, _trainable_state(unwrapped), 0
    diverged: str | None = None
    stop_reason = bound
    step, running, seen = 0, 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=max_steps, desc=f"{mode} on {task.name}", disable=not cfg.progress, dynamic_ncols=True)
    skip, checkpointed = 0, 0  # batches of the current epoch already trained on; evaluations checkpointed
    if resume_dir is not None:
        best_state = checkpoint.restore(tensors, saved, unwrapped, optimizer, scheduler)
        loop = saved["loop"]
        step, max_steps, best, best_step, stale = (loop[k] for k in ("step", "max_steps", "best", "best_step", "stale"))
        history, checkpointed = loop["history"], len(loop["history"])
        generator.set_state(tensors["rng.data"])
        skip, start = (step % steps_per_epoch) * cfg.grad_accum, start - loop["elapsed"]
        bar.update(step)
        if out is not None:
            (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))

    def record(metrics: dict[str, float]) -> None:
        row = {
            "step": step,
            "epoch": round(step / steps_per_epoch, 3),
            "train_loss": running / max(seen, 1),
            "lr": scheduler.get_last_lr()[0],
            "elapsed": round(time.perf_counter() - start, 2),
            **metrics,
        }
        history.append(row)
        accelerator.log(tracking.evaluation(row), step=step)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    model.train()
    while step < max_steps and diverged is None:
        epoch_state = generator.get_state()  # the data order of this epoch, for a checkpoint
        batches, skip = (accelerator.skip_first_batches(loader, skip) if skip else loader), 0
        for batch in batches:
            if dm is not None and out is not None and len(history) > checkpointed:  # an evaluation is complete
                checkpointed = len(history)
                loop = {"step": step, "max_steps": max_steps, "best": best, "best_step": best_step, "stale": stale}
                loop |= {"history": history, "elapsed": time.perf_counter() - start, "settings": settings}
                checkpoint.save(out, unwrapped, optimizer, scheduler, epoch_state, best_state, loop)
            with accelerator.accumulate(model):
                loss = objective.loss(model, batch)  # with the deltas' regularization (DeltaModel.forward)
                if not torch.isfinite(loss):
                    diverged = f"the loss became {loss.item()} at step {step}"
                    break
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    if not torch.isfinite(norm):
                        diverged = f"the gradients became non-finite at step {step}"
                        optimizer.zero_grad()
                        break
                optimizer.step()
                scheduler.step()
                for delta in dm.deltas.values() if dm is not None and accelerator.sync_gradients else ():
                    if delta.took_part():
                        delta.on_step(step + 1, max_steps)  # gradients still present (e.g. a rank schedule)
                optimizer.zero_grad()
            running, seen = running + global_mean(accelerator, loss), seen + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / seen:.4f}")
            if step % eval_every == 0 or step == max_steps:
                metrics = evaluate(unwrapped, objective, dev, task, cfg.eval_batch_size)
                record(metrics)
                running, seen = 0.0, 0
                bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", **{primary: f"{metrics[primary]:.4f}"})
                if metrics[primary] > best[primary]:
                    best, best_step, best_state, stale = metrics, step, _trainable_state(unwrapped), 0
                elif step > cfg.min_steps:  # a slow start before min_steps is not a plateau
                    stale += 1
                if cfg.progress:
                    bar.write(
                        f"step {step}/{max_steps}: train loss {history[-1]['train_loss']:.4f}, dev {primary} "
                        f"{metrics[primary]:.4f} (best {best[primary]:.4f} at step {best_step})"
                    )
                if cfg.patience is not None and stale >= cfg.patience and step < max_steps:
                    max_steps, stop_reason = step, "patience"  # early stopping: the best state is restored below
            if step >= max_steps:
                break
    bar.close()
    train_seconds = time.perf_counter() - start
    if diverged is not None:
        diverged += "; lower the learning rate (--lr). The best evaluated (or the initial) delta was kept"
        stop_reason = "diverged"
    params = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for n, v in best_state.items():
            params[n].copy_(v)
    # finalize first (diff pruning prunes, prefix drops its MLP), then score: every number reported (and saved
    # beside the delta) describes the delta that is saved, not the one before finalize()
    finalizing = dm is not None and any(type(d).finalize is not Delta.finalize for d in dm.deltas.values())
    if dm is not None:
        for delta in dm.deltas.values():
            delta.finalize()
    if not history or finalizing:  # diverged before any evaluation, or finalize() changed the kept delta
        best = evaluate(unwrapped, objective, dev, task, cfg.eval_batch_size)
        best_step = best_step if history else 0
    result = TrainResult(
        best, best_step, history, step, train_seconds, trainable, total, mode, diverged, stop_reason,
        majority_metrics(task, dev),
    )  # fmt: skip
    if test_examples is not None:
        result.test = evaluate(unwrapped, objective, list(test_examples), task, cfg.eval_batch_size)
    if trackers:
        accelerator.log(tracking.summary(result.best, result.best_step, result.test), step=step)
        accelerator.end_training()
    if out is not None:
        _save(unwrapped, dm, out, result, task, cfg, metadata)
    return unwrapped, result


def _save(
    model: nn.Module,
    dm: DeltaModel | None,
    out: Path,
    result: TrainResult,
    task: Task,
    cfg: TrainConfig | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    # everything `deltatune eval`/`predict`/`inspect` need to run under the training settings
    meta = {
        "task": task.name,
        "task_type": task.type,
        "labels": task.labels,
        "pairs": task.is_pair,  # inputs are text pairs ("a ||| b" on the command line)
        "task_source": task.source,
        "dev_split": task.meta.get("dev_split"),
        "columns": task.meta.get("columns"),  # the user's column names, as --columns mapped them
        "best": result.best,
        "best_step": result.best_step,
        "test": result.test,
        "mode": result.mode,
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY} if cfg else None,
        **(metadata or {}),
    }
    if cfg is not None and dm is not None:  # the rates the run used, where cfg.lr=None meant each method's own
        meta["rates"] = {n: cfg.lr or type(d.config).default_lr for n, d in dm.deltas.items()} | {"head": cfg.head_lr}
    if dm is not None:
        for name in dm.deltas:
            dm.save_delta(out / f"delta-{name}", name, include_head=True, **meta)
        if not dm.deltas and any(p.requires_grad for p in dm.backbone.parameters()):
            from .saved import save_head

            save_head(dm, out / "delta-head", **meta)
    atomic.write_file(out / "result.json", json.dumps(copy.deepcopy(result.to_dict()), indent=2, default=str))
