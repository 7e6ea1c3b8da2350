"""`python -m benchmarks [--suite train|infer|mixed|io|profile|all] [--quick] [--repeats N]`.

Runs the chosen suites in this process, prints each table of times and ratios, and writes one
JSON file (machine, versions, date, load average, raw timings, summaries) per run under
benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, infer, mixed, profile, train
from .harness import machine, write_json
from .models import SPECS, VARIANTS

SUITES = {"train": train, "infer": infer, "mixed": mixed, "io": checkpoint, "profile": profile}
ALL = ("train", "infer", "mixed", "io")  # profile is a development tool, run on request
RESULTS = Path(__file__).parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="deltatune against full fine-tuning and PEFT")
    p.add_argument("--suite", default="all", choices=[*SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="small batches and 3 repeats: a smoke run, not a measurement")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per configuration (default 7, quick 3)")
    p.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(SPECS)} (default: the real two)")
    p.add_argument("--variants", default=None, help=f"train suite: comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--no-memory", action="store_true", help="train suite: skip the per-configuration memory probes")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadiest on a shared machine; 0: torch's choice)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (memory is then max allocated)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<suite>-<date>.json)")
    p.add_argument("--resume", default=None, help="a report JSON to complete: finished suite/model pairs are kept")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    models = (args.models or "minilm-l6,smollm2-135m").split(",")
    unknown = [m for m in models if m not in SPECS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    args.models = models
    args.variants = args.variants.split(",") if args.variants else None
    bad = [v for v in args.variants or [] if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    suites = list(ALL) if args.suite == "all" else [args.suite]
    if args.resume:
        report = json.loads(Path(args.resume).read_text())
    else:
        report = {
            "machine": machine(),
            "args": {"suites": suites, "quick": args.quick, "repeats": repeats, "models": args.models},
            "suites": {},
        }
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "-".join(suites) + ("-quick" if args.quick else "")
    out = Path(args.resume or args.out or RESULTS / f"{tag}-{stamp}.json")
    for name in suites:
        print(f"== {name} ==", flush=True)
        kwargs: dict[str, Any] = {"quick": args.quick, "repeats": repeats, "device": args.device}
        if name == "train":
            kwargs.update(variants=args.variants, memory=not args.no_memory)
        done = report["suites"].setdefault(name, {})
        for model in args.models:  # one model at a time, written as it finishes: a long run can resume
            if model in done:
                print(f"[{name}/{model}] already in {out}, kept", flush=True)
                continue
            result = SUITES[name].run([model], **kwargs)
            for row in result.values():
                row.update(repeats=repeats, threads=torch.get_num_threads(), loadavg=list(os.getloadavg()))
            done.update(result)
            report["machine"]["loadavg_end"] = list(os.getloadavg())
            write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
