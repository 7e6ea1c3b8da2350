"""Where runs execute: in this process, in a pool of spawned processes, or on a Ray cluster.

Workers only compute: they take a job (JSON text) and return its results (JSON text). Claiming and
recording stay in the runner, the store's single writer, so an executor never touches SQLite and a
worker that dies loses nothing but its own run, which the next start retries.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _reset_peak_rss() -> bool:
    """Linux resets the process's peak RSS (VmHWM) on writing 5 to clear_refs; elsewhere it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux; a process-lifetime peak


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _budget_config(model: Any, name: str, settings: dict[str, Any], budget: int) -> dict[str, Any]:
    """The size setting that brings a method's trainable parameters closest to `budget` on this model."""
    from ..core.model import DeltaModel
    from ..core.settings import model_limit, size_field
    from ..methods import METHODS

    knob = size_field(METHODS[name])  # the field the method declares as its size (core.settings)
    if knob is None:
        raise ValueError(f"{name} has no size setting, so a parameter budget cannot be met; drop `budget` for it")

    def count(value: int) -> int:
        dm = DeltaModel(model)
        dm.add("probe", METHODS[name](**{**settings, knob: value}))
        n = sum(p.numel() for p in dm.delta("probe").parameters() if p.requires_grad)
        dm.detach()
        return n

    field = next(f for f in dataclasses.fields(METHODS[name]) if f.name == knob)
    top = field.metadata.get("le") or 1 << 16
    if field.metadata.get("limit"):  # a size bounded by the model (a rank at most its width): search below that
        top = min(top, model_limit(model, field.metadata["limit"]) or top)
    lo, hi = 1, 1
    while count(hi) < budget and hi < top:
        lo, hi = hi, min(hi * 2, top)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < budget else (lo, mid)
    best = min({max(1, lo - 1), lo}, key=lambda v: abs(count(v) - budget))
    return {**settings, knob: best}


def _load_task(name: str, cap: int | None) -> Any:
    """The task with dev and test cut to `cap` random examples (seed 0: the same for every run).

    Not the first `cap` rows: several files of the collection are sorted by label (mr, subj, mpqa, the
    test split of cr), and their first 150 rows are a single class.
    """
    from ..data.tasks import load_task
    from ..train.evaluation import eval_sample

    task = load_task(name)
    if cap is None:
        return task
    splits = dict(task.splits)
    for split in ("dev", "test"):
        if split in splits:
            splits[split] = eval_sample(list(splits[split]), cap)
    return dataclasses.replace(task, splits=splits)


def _train(job: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The run itself, through train.run.run like every run (a transfer run starts from its source's deltas)."""
    from ..data.tasks import load_task
    from ..methods import get_config
    from ..train import checkpoint
    from ..train.run import RunSpec, load_for_task, run
    from ..train.trainer import TrainConfig

    train_cfg = TrainConfig(**{"progress": False, **job["train"]})
    settings = {n: dict(s) for n, s in job["methods"].items()}
    if job.get("budget"):
        task = load_task(job["task"], splits=("dev",))
        model, _, _ = load_for_task(job["model"], task)
        name = next(iter(settings))
        settings[name] = _budget_config(model, name, settings[name], job["budget"])
    methods = {
        n: get_config(n, **{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
        for n, s in settings.items()
    }
    task = _load_task(job["task"], train_cfg.max_eval)
    spec = RunSpec(
        job["model"], task, methods, job["full"], train_cfg, job["k_shot"], job["max_train"], job["output_dir"],
        test=bool(job.get("eval_test")), init_from=job.get("init_from") or None, quantize=job.get("quantize"),
    )  # fmt: skip
    # a run cut short (a stopped or crashed study) continues from its last evaluation's checkpoint, to the same
    # result as an uninterrupted run (train/checkpoint.py): an STS-B run lost an hour at each restart
    kept = Path(job["output_dir"]) / checkpoint.FOLDER
    if (kept / checkpoint.STATE).exists():
        try:
            return run(dataclasses.replace(spec, resume=True))
        except checkpoint.ResumeRefused:  # written under other settings (an edited spec): start afresh
            shutil.rmtree(kept, ignore_errors=True)
    return run(spec)


def execute(job_text: str) -> str:
    """Run one job in this process and return its results; errors come back as text, never raised."""
    job = json.loads(job_text)
    try:
        import torch

        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        from transformers.utils import logging as hf_logging

        from ..train.upstream import quiet_upstream

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        quiet_upstream()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        resettable = _reset_peak_rss()
        start = time.perf_counter()
        model, result, task = _train(job)
        test = result.test  # scored by fit on the saved (finalized) delta, when eval_test and the task has test
        wall = time.perf_counter() - start
        out = Path(job["output_dir"])
        if job["full"]:  # the checkpoint full fine-tuning needs: the whole model (not written, to save disk)
            ckpt = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        else:
            ckpt = sum(_folder_bytes(f) for f in out.glob("delta-*")) + sum(
                f.stat().st_size for f in out.glob("head.safetensors")
            )
        metric = task.primary_metric
        return json.dumps(
            {
                "metric": metric,
                "dev_score": result.best.get(metric),
                "test_score": test.get(metric) if test else None,
                "best": result.best,
                "test": test,
                "best_step": result.best_step,
                "steps": result.steps,
                "trainable": result.trainable_parameters,
                "total": result.total_parameters,
                "train_seconds": result.train_seconds,
                "wall_seconds": wall,
                "step_seconds": result.train_seconds / max(result.steps, 1),
                "peak_memory": torch.cuda.max_memory_allocated() if cuda else _peak_rss(),
                "memory_kind": "cuda_max_allocated" if cuda else ("rss_peak" if resettable else "rss_process_peak"),
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "delta_path": str(out),
                "checkpoint_bytes": ckpt,
                "diverged": result.diverged,
                "stop_reason": result.stop_reason,
                "majority": (result.majority or {}).get(metric),
                "lr": _effective_lr(job),
                "history": result.history,
            },
            default=float,
        )
    except Exception as err:  # noqa: BLE001 - one failed run must not end the study
        tail = "".join(traceback.format_exception(err)[-3:])
        return json.dumps({"error": f"{type(err).__name__}: {err}\n{tail}"})


def _effective_lr(job: dict[str, Any]) -> float | None:
    """The learning rate the run's main parameters trained at: the head's for head-only, else the delta's
    (the first method's when several are combined), as the trainer resolves it."""
    from ..methods import METHODS
    from ..train.trainer import FULL_FT_LR, TrainConfig

    cfg = TrainConfig(**{"progress": False, **job["train"]})
    if job["full"]:
        return cfg.lr or FULL_FT_LR
    if not job["methods"]:
        return cfg.head_lr
    return cfg.lr or METHODS[next(iter(job["methods"]))].default_lr


# ----------------------------------------------------------------------------- executors


class _Done:
    """A finished run's handle: unique per run even when two results read the same."""

    def __init__(self, text: str) -> None:
        self.text = text


class SequentialExecutor:
    """Runs in this process, one at a time: the default, and the one whose failures are easiest to read."""

    workers = 1

    def submit(self, job: dict[str, Any]) -> Any:
        return _Done(execute(json.dumps(job)))

    def wait(self, pending: dict[Any, dict[str, Any]]) -> Iterator[tuple[Any, str]]:
        for handle in list(pending):
            yield handle, handle.text

    def close(self) -> None:
        pass


def _die_with(parent: int, interval: float = 0.5) -> None:
    """Worker initializer: exit as soon as the runner that started this worker is gone.

    A runner killed with SIGKILL cannot shut its pool down, and a worker mid-run would otherwise train
    on for minutes holding its memory (~0.5 GB each). The worker was re-parented when its parent died,
    so a daemon thread watching os.getppid() notices within `interval` seconds (Linux, macOS alike).
    """
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    if os.getppid() != parent:  # the runner died before this worker started
        os._exit(1)
    threading.Thread(target=watch, name="die-with-runner", daemon=True).start()


class ProcessExecutor:
    """A pool of spawned processes (fork is unsafe once torch has started threads); they die with the runner."""

    def __init__(self, workers: int) -> None:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self.pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with, initargs=(os.getpid(),)
        )

    def submit(self, job: dict[str, Any]) -> Any:
        return self.pool.submit(execute, json.dumps(job))

    def wait(self, pending: dict[Any, dict[str, Any]]) -> Iterator[tuple[Any, str]]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in done:
            yield future, future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RayExecutor:
    """Runs as Ray tasks: on a cluster when `address` names one, else on a local Ray started here."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as err:
            raise ImportError("--executor ray needs Ray: pip install 'deltatune[ray]'") from err
        self.ray = ray
        if not ray.is_initialized():
            ray.init(
                address=address, num_cpus=None if address else workers, include_dashboard=False, log_to_driver=False
            )
            if address is None:  # a local Ray started here: its processes must not outlive this runner
                from .reaper import descendants, reap_when_dead

                reap_when_dead(descendants())
        self.remote = ray.remote(num_cpus=1)(execute)
        self.workers = workers

    def submit(self, job: dict[str, Any]) -> Any:
        return self.remote.remote(json.dumps(job))

    def wait(self, pending: dict[Any, dict[str, Any]]) -> Iterator[tuple[Any, str]]:
        done, _ = self.ray.wait(list(pending), num_returns=1)
        for ref in done:
            yield ref, self.ray.get(ref)

    def close(self) -> None:
        pass


def check_executor(kind: str, workers: int = 1, address: str | None = None) -> None:
    """The executor's settings, checked before anything is planned (Ray missing was said after the store was
    made; `--workers 4` without `--executor process` ran one run at a time without a word)."""
    import importlib.util

    if kind not in ("sequential", "process", "ray"):
        raise ValueError(f"unknown executor {kind!r}; use sequential, process or ray")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if kind == "sequential" and (workers > 1 or address):
        raise ValueError(f"--{'workers' if workers > 1 else 'address'} needs --executor process (or ray); the "
                         "sequential executor runs one run at a time in this process")  # fmt: skip
    if address and kind != "ray":
        raise ValueError("--address names a Ray cluster: add --executor ray")
    if kind == "ray" and importlib.util.find_spec("ray") is None:
        raise ImportError("--executor ray needs Ray: pip install 'deltatune[ray]'")


def make_executor(kind: str, workers: int = 1, address: str | None = None) -> Any:
    if kind == "sequential":
        return SequentialExecutor()
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if kind == "process":
        return ProcessExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise ValueError(f"unknown executor {kind!r}; use sequential, process or ray")
