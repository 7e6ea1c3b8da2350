"""Checks of a study's grid as a whole, at planning time: what would otherwise fail (or collide) run by run.

Two tasks or models whose folders share a name would be filed under one run key (the key names the
folder); an encoder-decoder backbone cannot be trained by the runner; a generation task needs a
causal LM. Each is one line before the first run, not a failure per run an hour later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
