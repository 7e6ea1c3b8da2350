"""What `deltatune eval`/`predict` need to know of an OpenDelta `save_finetuned` folder (read by cli/foreign.py).

OpenDelta writes `config.json` beside its tensors, as a transformers model folder does, so the folder is told
apart the way `import_opendelta` tells it: `delta_type` and `backbone_class` in that config.json (a deltatune
delta folder, which has `delta.json`, is checked for first). The base model it names,
`backbone_checkpoint_name`, is only the last path component of the model's `_name_or_path` (`bert-base-uncased`,
or `minilm` for `/data/minilm`); the classifier head is in the tensors when it trained with the delta
(`freeze_module(exclude=["deltas", "classifier"])`), under the names of `backbone_class`'s state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..interop.opendelta import check_type
from ..interop.opendelta_common import CONFIG, is_opendelta_folder, read_folder

FIELD = "backbone_checkpoint_name"
NO_HEAD = (
    'OpenDelta saves it when the head trains with the delta, freeze_module(exclude=["deltas", "classifier"]), '
    "and imports it onto a model of the class it was saved from"
)


def config(folder: str) -> dict[str, Any] | None:
    """OpenDelta's config.json in `folder`, or None when the folder holds no OpenDelta checkpoint."""
    return json.loads((Path(folder) / CONFIG).read_text()) if is_opendelta_folder(folder) else None


def check(folder: str, saved: dict[str, Any], model: str, model_type: str | None) -> None:
    """Before a model loads: deltatune imports this delta_type, saved from a model of `model`'s architecture."""
    import transformers

    check_type(saved, folder)
    cls = getattr(transformers, str(saved.get("backbone_class")), None)
    theirs = getattr(getattr(cls, "config_class", None), "model_type", None)
    if theirs and model_type and theirs != model_type:
        raise ValueError(
            f"{folder} was saved from a {saved['backbone_class']} ({theirs}) and {model} is a {model_type} model: "
            "pass --model the backbone the delta was trained on"
        )


def head_rows(folder: str, weight: str, saved_class: str | None, model_class: str) -> int | None:
    """Rows of the classifier weight `weight` (its name in `model_class`) that the folder saves; None when none.

    OpenDelta keys the tensors as `saved_class`'s state dict names them: the same class puts the head under the
    same name; another (a bare BertModel) saves no head that `import_opendelta` copies."""
    if saved_class != model_class:
        return None
    _, tensors = read_folder(folder)
    value = tensors.get(weight)
    return int(value.shape[0]) if value is not None and value.dim() == 2 else None
