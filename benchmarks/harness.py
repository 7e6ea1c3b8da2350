"""Timing that survives a shared, noisy machine: interleaved, repeated, summarised as ratios.

Every configuration of a suite lives in the same process and is timed round-robin: repeat r runs
each configuration once, starting at a rotated position, so a burst of load from another process
hits all configurations alike. The headline is a ratio to a baseline measured beside it, over
the minimum (the least disturbed run) and over the median; paired ratios (this repeat's time over
the baseline's time in the same repeat) cancel slow drifts of the machine's load.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Timings = dict[str, list[float]]


def interleave(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, inner: int = 1) -> Timings:
    """Seconds per call of each case, `repeats` samples each, taken round-robin after `warmup` calls."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times: Timings = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            start = time.perf_counter()
            for _ in range(inner):
                cases[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def summarize(times: Timings, baseline: str | None) -> dict[str, dict[str, float]]:
    """min/median seconds per case and, where a baseline ran, the ratios to it."""
    out: dict[str, dict[str, float]] = {}
    base = times.get(baseline) if baseline else None
    for name, samples in times.items():
        row = {"min_s": min(samples), "median_s": statistics.median(samples)}
        if base:
            row["ratio_min"] = row["min_s"] / min(base)
            row["ratio_median"] = row["median_s"] / statistics.median(base)
            row["ratio_paired_median"] = statistics.median(s / b for s, b in zip(samples, base, strict=True))
        out[name] = row
    return out


def table(summary: dict[str, dict[str, float]], baseline: str | None, unit: str = "ms") -> str:
    """A plain-text table of a summary, one line per case."""
    scale = 1e3 if unit == "ms" else 1.0
    head = f"{'case':<24} {'min ' + unit:>10} {'median ' + unit:>10}"
    if baseline:
        head += f" {'x min':>7} {'x median':>9} {'x paired':>9}   (ratios to {baseline})"
    lines = [head]
    for name, row in summary.items():
        line = f"{name:<24} {row['min_s'] * scale:>10.1f} {row['median_s'] * scale:>10.1f}"
        if "ratio_min" in row:
            line += f" {row['ratio_min']:>7.3f} {row['ratio_median']:>9.3f} {row['ratio_paired_median']:>9.3f}"
        lines.append(line)
    return "\n".join(lines)


def machine(packages: tuple[str, ...] = ("peft",)) -> dict[str, Any]:
    """What the numbers were measured on, how busy the machine was, and the compared `packages`' versions."""
    import importlib.metadata

    import transformers

    import deltatune

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deltatune": deltatune.__version__,
        **{name: importlib.metadata.version(name) for name in packages},
        "loadavg_start": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process from /proc (VmRSS now, VmHWM the peak), in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status: RSS is measured on Linux only")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically: a temporary file in the same folder, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    return write_text(path, json.dumps(data, indent=1) + "\n")
