"""A study spec (YAML or TOML), checked field by field into a `StudySpec` (grid.py expands it into runs).

A study is a grid: models x tasks x methods x seeds, plus the runs two analyses need beyond it
(every subset of the combined methods; a delta trained on task A and continued on task B). The spec
is checked as a whole before anything runs, so a typo in run 70 of 72 fails in the first second,
with the field and the fix named.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..methods import METHODS
from ..train.checks import MAX_SEED, check_max_length
from ..train.tracking import parse as parse_trackers
from ..train.trainer import TrainConfig
from .grid import Method, StudySpec, combination_labels, task_name  # noqa: F401 - importable from here, as before
from .lr_grid import parse as parse_lr_grid
from .lr_grid import study_task
from .spec_checks import check_columns, check_grid, check_k_shot, check_shapes, resolve_tasks
from .spec_file import SpecError, read_spec_file  # noqa: F401 - both importable from here, as before

ANALYSES = ("performance", "convergence", "efficiency", "combination", "transfer", "scaling")
BASELINES = ("full", "head")  # full fine-tuning; a frozen backbone with a trained head (the paper's "none")
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
RUN_FIELDS = {"lr", "budget"}  # per-method-entry settings that are not the method's own
TOP_FIELDS = {
    "name",
    "description",
    "models",
    "tasks",
    "methods",
    "seeds",
    "k_shot",
    "max_train",
    "train",
    "analyses",
    "combination",
    "transfer",
    "eval_test",
    "threads",
    "lr_grid",
    "more_seeds",
    "task_train",
    "quantize",
}
PRESETS_DIR = Path(__file__).parent / "presets"
MAX_RUNS = 20_000


def _fail(field: str, problem: str, fix: str) -> SpecError:
    return SpecError(f"study spec: {field}: {problem}; {fix}")


def _quantize(value: Any, methods: list[Method]) -> str | None:
    """Every run on a backbone quantized by bitsandbytes (QLoRA's recipe; `quantization.py`): 4bit or 8bit."""
    from ..quantization import QUANTIZE, check_quantize

    if value is None:
        return None
    if value not in QUANTIZE:
        raise _fail("quantize", f"{value!r} is not one of {', '.join(QUANTIZE)}", "write `quantize: 4bit`, or drop it")
    if any(m.full for m in methods):
        raise _fail("quantize", "full fine-tuning cannot train a quantized backbone", "drop `full` from methods")
    try:
        check_quantize(value)
    except ImportError as err:
        raise _fail("quantize", str(err).partition(": ")[0], str(err).partition(": ")[2]) from None
    return value


def _list(raw: dict[str, Any], field: str, default: Any = None) -> list:
    value = raw.get(field, default)
    if value is None:
        raise _fail(field, "missing", f"add e.g. `{field}: [...]`")
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:  # a study of no runs reported success ("0 to run, 0 done")
        raise _fail(field, "is empty", f"list at least one, e.g. `{field}: [...]`, or drop the field for its default")
    return values


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@=-]{0,99}")


def _check_name(field: str, name: str) -> None:
    """Labels and study names become folder and file names: they must stay inside the folder they are for."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise _fail(
            field,
            f"{name!r} cannot name a folder",
            "use letters, digits and _ . + @ = - (no '/', no '..', at most 100 characters), e.g. lora@r16",
        )


def _parse_method(label: str, value: Any) -> Method:
    field = f"methods.{label}"
    _check_name(field, label)
    if value is not None and not isinstance(value, dict):
        raise _fail(field, f"settings must be a mapping, got {value!r}", "write e.g. `lora: {r: 8}` or `lora: {}`")
    settings = dict(value or {})
    run = {k: settings.pop(k) for k in list(settings) if k in RUN_FIELDS}
    base = label.split("@")[0]  # "prefix@lr5e-4": a second column of the same method with other settings
    if base in BASELINES:
        if settings or run.get("budget") is not None:  # a budget was dropped without a word
            extra = sorted(settings) or ["budget"]
            raise _fail(field, f"the {label} baseline has no settings {extra}", "only lr may be set")
        return Method(label, {}, run.get("lr"))
    names = base.split("+")
    if len(set(names)) != len(names):
        raise _fail(field, "a method is named twice", "name each method once, e.g. prompt+bitfit")
    for name in names:
        if name not in METHODS:
            import difflib

            close = difflib.get_close_matches(name, list(METHODS) + list(BASELINES), n=2)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(METHODS)}, full, head"
            raise _fail(field, f"unknown method {name!r}", hint)
    if len(names) == 1:
        configs = {names[0]: settings}
    else:  # a combination: settings are addressed per method, e.g. {prompt: {num_tokens: 20}}
        stray = [k for k in settings if k not in names]
        if stray:
            raise _fail(field, f"{stray} are not methods of this combination", f"nest settings under one of {names}")
        configs = {n: dict(settings.get(n) or {}) for n in names}
    for name, cfg in configs.items():
        fields = {f.name for f in dataclasses.fields(METHODS[name])}
        bad = sorted(set(cfg) - fields)
        if bad:
            raise _fail(f"{field}.{name}", f"no setting {bad[0]!r}", f"its settings: {', '.join(sorted(fields))}")
        try:
            METHODS[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}).validate()
        except (TypeError, ValueError) as err:
            raise _fail(f"{field}.{name}", str(err), "fix that setting") from err
    budget = run.get("budget")
    if budget is not None and (not isinstance(budget, int) or budget <= 0 or len(names) != 1):
        raise _fail(f"{field}.budget", f"{budget!r} is not usable", "give one method a positive parameter count")
    return Method(label, configs, run.get("lr"), budget)


def _parse_methods(raw: Any) -> list[Method]:
    if raw is None:
        raise _fail("methods", "missing", "add e.g. `methods: {full: {}, lora: {r: 8}, prompt: {}}`")
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):  # [lora, {adapter: {bottleneck: 16}}, full]
        items: list[tuple[str, Any]] = []
        for entry in raw:
            items += list(entry.items()) if isinstance(entry, dict) else [(str(entry), None)]
    elif isinstance(raw, dict):
        items = list(raw.items())
    else:
        raise _fail("methods", f"got {type(raw).__name__}", "write a mapping {label: settings} or a list of names")
    if not items:
        raise _fail("methods", "is empty", "add e.g. `methods: {full: {}, lora: {r: 8}}`")
    return [_parse_method(str(label), value) for label, value in items]


def parse_spec(raw: dict[str, Any], name: str = "study") -> StudySpec:
    """Check a spec mapping (as read from YAML/TOML) field by field and build the StudySpec."""
    if raw is None:
        raise _fail("(top level)", "the file is empty", "write a spec, e.g. `deltatune study presets` lists examples")
    if not isinstance(raw, dict):
        raise _fail("(top level)", f"got {type(raw).__name__}", "a study spec is a mapping of fields")
    unknown = sorted(set(raw) - TOP_FIELDS)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(TOP_FIELDS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(TOP_FIELDS))}"
        raise _fail(unknown[0], "unknown field", hint)
    check_shapes(raw, _fail)
    train = dict(raw.get("train") or {})
    bad = sorted(set(train) - TRAIN_FIELDS)
    if bad:
        raise _fail(f"train.{bad[0]}", "not a TrainConfig field", f"use one of {', '.join(sorted(TRAIN_FIELDS))}")
    if "seed" in train:  # each run trains with its own seed of `seeds`: this one was overridden without a word
        raise _fail("train.seed", "runs take their seeds from `seeds`", f"write `seeds: [{train['seed']}]` instead")
    try:
        TrainConfig(**train)
    except TypeError as err:
        raise _fail("train", str(err), "check the training settings") from err
    try:  # every run would fail on a tracker not installed: refused with the spec, before the first run
        parse_trackers(train.get("report_to"))
    except ValueError as err:
        raise _fail("train.report_to", str(err), "install it, or drop report_to") from err
    models = [str(m) for m in _list(raw, "models", ["minilm-l6"])]
    methods = _parse_methods(raw.get("methods"))
    check_columns(raw, methods, _fail)
    seeds = _list(raw, "seeds", [42])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail("seeds", f"{_short(seeds)} are not all integers", "write e.g. `seeds: [42, 43, 44]`")
    if not all(0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise _fail(
            "seeds",
            f"{_short(seeds)} holds a repeat or a seed outside 0..{MAX_SEED}",
            "list distinct seeds, e.g. [42, 43]",
        )
    k_shot, max_train = raw.get("k_shot"), raw.get("max_train")
    if k_shot is not None and max_train is not None:
        raise _fail("k_shot", "k_shot and max_train both set", "keep one of them")
    for field, v in (("k_shot", k_shot), ("max_train", max_train), ("threads", raw.get("threads"))):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise _fail(field, f"{v!r} is not a positive integer", f"write e.g. `{field}: 16` or drop it")
    threads = raw.get("threads")
    if threads is not None and threads > max_threads():
        raise _fail(
            "threads", f"{threads} is more than {max_threads()} (4 per core here)", "use at most the cores you have"
        )
    _check_train_values(train, "train")
    quantize = _quantize(raw.get("quantize"), methods)
    analyses = _list(raw, "analyses", ["performance", "convergence", "efficiency"])
    for a in analyses:
        if a not in ANALYSES:
            raise _fail("analyses", f"unknown analysis {a!r}", f"choose from {', '.join(ANALYSES)}")
    combo = raw.get("combination") or {}
    combination = [str(m) for m in (combo.get("methods") or [])] if isinstance(combo, dict) else []
    for m in combination:
        if m not in METHODS:
            raise _fail(
                "combination.methods", f"unknown method {m!r}", "use method names, e.g. [prompt, bitfit, adapter]"
            )
    if "combination" in analyses and not combination:
        raise _fail(
            "combination",
            "the combination analysis needs methods",
            "add `combination: {methods: [prompt, bitfit, adapter]}`",
        )
    transfer = raw.get("transfer") or {}
    t_tasks = resolve_tasks(transfer["tasks"], "transfer.tasks", _fail) if transfer.get("tasks") else []
    t_methods = [str(m) for m in (transfer.get("methods") or [])]
    labels = {m.label for m in methods}
    for m in t_methods:
        if m not in labels or m in BASELINES:
            raise _fail(
                "transfer.methods",
                f"{m!r} is not a delta method of this study",
                f"use some of {sorted(labels - set(BASELINES))}",
            )
    if "transfer" in analyses and (len(t_tasks) < 2 or not t_methods):
        raise _fail(
            "transfer",
            "the transfer analysis needs 2+ tasks and a method",
            "add `transfer: {tasks: [sst2, mr], methods: [lora]}`",
        )
    if "scaling" in analyses and len(models) < 2:
        raise _fail("models", "the scaling analysis needs 2+ models", "list several models or drop `scaling`")
    tasks = resolve_tasks(raw.get("tasks", t_tasks or None) or _list(raw, "tasks"), "tasks", _fail)
    for model in models:
        if not _SAFE_NAME.fullmatch(Path(model).name) or ".." in Path(model).name:  # runs are filed under it
            raise _fail(
                "models",
                f"{model!r} does not end in a folder name",
                "give the model folder by its path, e.g. ./models/tiny-bert",
            )
        check_model(model)
        for where, over in [
            ("train", train),
            *((f"task_train.{t}", o or {}) for t, o in (raw.get("task_train") or {}).items()),
        ]:
            length = over.get("max_length")  # only a length the spec sets (the default suits short texts)
            try:
                check_max_length(model, length, f"{where}.max_length") if isinstance(length, int) else None
            except ValueError as err:
                raise _fail("models", str(err), f"lower {where}.max_length") from None
    check_grid(models, list(dict.fromkeys(tasks + t_tasks)), _fail)
    if "name" in raw:
        _check_name("name", str(raw["name"]))
    grid = parse_lr_grid(raw.get("lr_grid"), labels, tasks, seeds, _fail)
    more = raw.get("more_seeds") or {}
    if not isinstance(more, dict) or set(more) - {"seeds", "tasks"}:
        raise _fail("more_seeds", f"got {more!r}", "write `more_seeds: {seeds: [43, 44], tasks: [sst2, rte]}`")
    if "seeds" in more and not more["seeds"]:
        raise _fail(
            "more_seeds.seeds", "is empty", "list the further seeds, e.g. `seeds: [43, 44]`, or drop more_seeds"
        )
    more_seeds = [s for s in (more.get("seeds") or []) if s not in seeds]
    if not all(isinstance(s, int) for s in more_seeds):
        raise _fail("more_seeds.seeds", f"{more_seeds} are not all integers", "write e.g. `seeds: [43, 44]`")
    more_tasks = [study_task(str(t), tasks) for t in (more.get("tasks") or [])]
    stray = [t for t in more_tasks if t not in tasks]
    if stray:
        raise _fail("more_seeds.tasks", f"{stray} are not tasks of this study", f"use some of {tasks}")
    check_k_shot(list(dict.fromkeys(tasks + t_tasks)), k_shot, _fail)
    task_train = raw.get("task_train") or {}
    names = {task_name(t) for t in tasks}
    for t, over in task_train.items():
        if t not in names:
            raise _fail(f"task_train.{t}", "not a task of this study", f"use one of {sorted(names)}")
        bad = sorted(set(over or {}) - TRAIN_FIELDS)
        if bad:
            raise _fail(f"task_train.{t}.{bad[0]}", "not a TrainConfig field", "use a field of `train`")
        if "seed" in (over or {}):  # the run's seed won, without a word
            raise _fail(f"task_train.{t}.seed", "not a per-task training field", "seeds come from `seeds`")
        _check_train_values(dict(over or {}), f"task_train.{t}")
    runs = len(models) * len(tasks) * len(methods) * (len(seeds) + len(more_seeds))
    if runs > MAX_RUNS:
        raise _fail("seeds", f"the grid is {runs:,} runs, more than {MAX_RUNS:,}", "split it into several studies")
    return StudySpec(
        name=str(raw.get("name", name)),
        models=models,
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        k_shot=k_shot,
        max_train=max_train,
        quantize=quantize,
        train=train,
        analyses=analyses,
        combination=combination,
        transfer_tasks=t_tasks,
        transfer_methods=t_methods,
        eval_test=bool(raw.get("eval_test", True)),
        threads=raw.get("threads"),
        description=str(raw.get("description", "")),
        lr_grid=grid,
        more_seeds=more_seeds,
        more_seeds_tasks=more_tasks if more_seeds else [],
        task_train={t: dict(v or {}) for t, v in task_train.items()},
        raw=raw,
    )


def check_model(model: str) -> None:
    """Fail before the study starts when a backbone cannot be loaded offline."""
    from ..backbones import ALIASES, SHORT_NAMES, check_installed, hub_refusal

    if model in SHORT_NAMES or model in ALIASES:
        try:
            check_installed(model)
        except FileNotFoundError as err:
            raise _fail("models", str(err), f"install it, or drop {model!r} from models") from err
    elif not Path(model, "config.json").exists() and (reason := hub_refusal(model)) is not None:
        raise _fail(
            "models",
            f"{model!r} is neither a short name nor a model folder with config.json, and {reason}",
            "use minilm-l6, smollm2-135m, mpnet-base, a local folder or a hub id the hub has",
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(value) if hasattr(value, '__len__') else '?'} items)"


def max_threads() -> int:
    import os

    return 4 * (os.cpu_count() or 1)


def _check_train_values(values: dict[str, Any], where: str) -> None:
    """The training settings of a spec, checked by the rules `deltatune train`'s flags follow."""
    from ..train.checks import check_train_value

    for key, value in values.items():
        try:
            check_train_value(key, value)
        except ValueError as err:
            raise _fail(
                f"{where}.{key}", str(err), "see `deltatune train --help` for what each setting takes"
            ) from None


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def load_spec(source: str | Path) -> StudySpec:
    """A spec from a file (.yaml, .yml, .toml, .json) or a preset name (`deltatune study presets`)."""
    known = presets()
    if str(source) in known:
        path = known[str(source)]
    else:
        path = Path(source)
        if not path.exists():
            import difflib

            close = difflib.get_close_matches(str(source), list(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise FileNotFoundError(
                f"no study spec {str(source)!r}: {hint}give a .yaml/.toml file or a preset ({', '.join(known)})"
            )
    return parse_spec(read_spec_file(path), name=path.stem)
