"""Checks of a study's grid as a whole, at planning time: what would otherwise fail (or collide) run by run.

Two tasks or models whose folders share a name would be filed under one run key (the key names the
folder); an encoder-decoder backbone cannot be trained by the runner; a generation task needs a
causal LM. Each is one line before the first run, not a failure per run an hour later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .grid import task_name


def check_grid(models: list[str], tasks: list[str], fail: Callable[[str, str, str], Exception]) -> None:
    for field, items, name in (("tasks", tasks, task_name), ("models", models, lambda m: Path(m).name)):
        seen: dict[str, str] = {}
        for item in items:
            other = seen.setdefault(name(item), item)
            if other != item:
                raise fail(
                    field,
                    f"{other!r} and {item!r} share the folder name {name(item)!r}, which names their runs in the store",
                    "rename one folder (or copy it under another name)",
                )
    from ..data.tasks import load_task

    kinds = {t: load_task(t, splits=("dev",)).type for t in tasks}
    for model in models:
        config = _config(model)
        if config is None:
            continue
        if getattr(config, "is_encoder_decoder", False):
            raise fail(
                "models",
                f"{model!r} is an encoder-decoder ({config.model_type}), which the study runner cannot train",
                "use an encoder (minilm-l6) or a causal LM (smollm2-135m)",
            )
        generation = [t for t, kind in kinds.items() if kind == "generation"]
        if generation and not _causal(config):
            raise fail(
                "tasks",
                f"{task_name(generation[0])!r} is a generation task and {model!r} is not a causal LM",
                "use a causal LM (smollm2-135m) for it, or drop it from tasks",
            )


def _config(model: str):  # noqa: ANN202 - a transformers config, or None when the backbone cannot be read here
    from transformers import AutoConfig

    from ..backbones import model_path

    try:
        return AutoConfig.from_pretrained(model_path(model))
    except (OSError, ValueError, FileNotFoundError):
        return None


def _causal(config) -> bool:  # noqa: ANN001
    from ..train.own_head import saved_classifier
    from ..train.run import CAUSAL_TYPES

    archs = getattr(config, "architectures", None) or []
    lm = config.model_type in CAUSAL_TYPES or any(a.endswith("ForCausalLM") for a in archs)
    return lm and not saved_classifier(config)


def check_shapes(raw: dict[str, Any], fail: Callable[[str, str, str], Exception]) -> None:
    """The spec's sections have the shapes they are read as, before anything reads them: a mapping where a mapping
    goes (`train`, `task_train.<task>`), integer seeds, a real boolean. Before, `task_train: {rte: 128}` ended in
    an AttributeError, `eval_test: "false"` was read as true, and `more_seeds` seeds `[true]` planned runs `sTrue`."""
    from ..train.checks import MAX_SEED

    for field in ("train", "task_train", "more_seeds", "combination", "transfer", "lr_grid"):
        if raw.get(field) is not None and not isinstance(raw[field], dict):
            raise fail(field, f"got {raw[field]!r}, not a mapping", f"write `{field}: {{...}}` (see docs/study.md)")
    for task, over in (raw.get("task_train") or {}).items():
        if over is not None and not isinstance(over, dict):
            raise fail(
                f"task_train.{task}", f"got {over!r}, not a mapping", f"write e.g. `{task}: {{max_length: 128}}`"
            )
    if "eval_test" in raw and not isinstance(raw["eval_test"], bool):
        raise fail("eval_test", f"{raw['eval_test']!r} is not true or false", "write `eval_test: false` (no quotes)")
    more = raw.get("more_seeds") or {}
    seeds = more.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEED for x in seeds
        ):
            raise fail("more_seeds.seeds", f"{seeds!r} are not all seeds 0..{MAX_SEED}", "write e.g. `seeds: [43, 44]`")
        if not more.get("tasks"):
            raise fail("more_seeds.tasks", "missing: the further seeds run on no task", "add e.g. `tasks: [sst2, rte]`")
    seed = (raw.get("lr_grid") or {}).get("seed")
    if isinstance(seed, bool):
        raise fail("lr_grid.seed", f"{seed!r} is not an integer", "write e.g. `seed: 42`")
    for section, field in (
        ("lr_grid", "tasks"),
        ("transfer", "methods"),
        ("transfer", "tasks"),
        ("more_seeds", "tasks"),
    ):
        value = (raw.get(section) or {}).get(field)
        if isinstance(value, str):  # iterated, a string gave its letters: "['s', 's', 't', '2'] are not tasks"
            raise fail(f"{section}.{field}", f"{value!r} is one name, not a list", f"write `{field}: [{value}]`")
    combo = raw.get("combination") or {}
    stray = sorted(set(combo) - {"methods", "configs"})
    if stray:
        raise fail(f"combination.{stray[0]}", "unknown field", "combination takes `methods` and `configs`")


def check_columns(raw: dict[str, Any], methods: list[Any], fail: Callable[[str, str, str], Exception]) -> None:
    """A column's own `lr` follows `train.lr`'s rules (`lr: -1` trained at -1; YAML's `1e-3` is text and failed
    every run of the column); a column with its own `lr` is not also in `lr_grid` (its grid ran for nothing); a
    combined method's `combination.configs` must be valid settings and not shadow the method's own column."""
    from ..methods import METHODS
    from ..train.checks import check_train_value

    for m in methods:
        if m.lr is not None:
            try:
                check_train_value("lr", m.lr)
            except ValueError as err:
                raise fail(
                    f"methods.{m.label}.lr", str(err), "write e.g. `lr: 1.0e-3` (YAML reads 1e-3 as text)"
                ) from None
    rates = (raw.get("lr_grid") or {}).get("rates") or {}
    fixed = [m.label for m in methods if m.lr is not None and m.label in rates]
    if fixed:
        raise fail(f"lr_grid.rates.{fixed[0]}", "the column sets its own lr", "drop its lr, or drop it from lr_grid")
    labels = {m.label for m in methods}
    combined = (raw.get("combination") or {}).get("methods") or []
    for m in methods:  # a combination trains each method at its default rate, its single row is this column
        if m.label in combined and (m.lr is not None or m.label in rates):
            how = f"trains at lr {m.lr:g}" if m.lr is not None else "takes its rate from lr_grid"
            raise fail(
                f"methods.{m.label}",
                f"column {m.label} {how}, while the combination trains {m.label} at its default rate inside every "
                f"combined row: the table would compare its {m.label} row with the others at other rates",
                f"label the tuned column otherwise (e.g. {m.label}@tuned): the combination then runs its own "
                f"{m.label} row at the default rate",
            )
    for name, settings in ((raw.get("combination") or {}).get("configs") or {}).items():
        if name in labels:
            raise fail(f"combination.configs.{name}", f"the study has a {name} column, whose settings combine",
                       f"set them in methods.{name}, or drop this entry")  # fmt: skip
        if name not in METHODS:
            raise fail(f"combination.configs.{name}", "not a method", f"use one of {', '.join(METHODS)}")
        try:
            METHODS[name](**dict(settings or {})).validate()
        except (TypeError, ValueError) as err:
            raise fail(f"combination.configs.{name}", str(err), "fix that setting") from err


def check_k_shot(tasks: list[str], k_shot: int | None, fail: Callable[[str, str, str], Exception]) -> None:
    """Every task can give `k_shot` training examples per class: one that cannot failed every run of it at run time
    (with `tasks: all` and `k_shot: 16`, cb and tweet_eval_stance_climate)."""
    if k_shot is None:
        return
    from ..data.fewshot import few_shot
    from ..data.tasks import load_task

    for t in tasks:
        try:
            few_shot(load_task(t, splits=("train",)), k_shot)
        except ValueError as err:  # DataError is a ValueError
            raise fail("k_shot", f"{t}: {err}", "lower k_shot, or leave the task out") from None


def resolve_tasks(value: Any, field: str, fail: Callable[[str, str, str], Exception]) -> list[str]:
    """The spec's tasks (`all`: the collection's classification and regression tasks), each read now: train and dev."""
    from ..data.tasks import list_tasks, load_task

    if value == "all" or value == ["all"]:
        try:
            rows = list_tasks()
        except FileNotFoundError as err:
            raise fail(field, f"`all` needs the task collection ({err})", "set $DELTATUNE_DATA") from err
        return [r["name"] for r in rows if r["type"] != "generation"]
    tasks = [str(t) for t in (value if isinstance(value, list) else [value])]
    for t in tasks:
        try:  # train too: a missing train file or a label outside meta.json failed every run of the task, late
            load_task(t, splits=("train", "dev"))
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise fail(field, str(err.args[0] if err.args else err), "see `deltatune tasks` for the names") from err
    return tasks
