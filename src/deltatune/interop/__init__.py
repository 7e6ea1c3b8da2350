"""Moving deltas between deltatune and other libraries' formats.

`import_peft(model, folder)` reads any PEFT adapter folder deltatune can represent exactly (LoRA
with rsLoRA and rank/alpha patterns, DoRA, LoHa, LoKr, OFT, VeRA, AdaLoRA, IA3, LN tuning, prompt
tuning, prefix tuning) and
`export_peft(dm, folder)` writes one; everything else is refused with the reason.
`import_adapterhub(model, folder)` reads an AdapterHub (`adapters` library) folder: bottleneck adapters
(seq_bn, double_seq_bn, par_bn), LoRA and (IA)^3, with AdapterHub's outputs exactly, and
`export_adapterhub(dm, folder)` writes one (`model.load_adapter(folder, use_safetensors=True)` loads it).
`import_opendelta(model, folder)` reads an OpenDelta `save_finetuned` folder (LoRA, adapter, low-rank and
parallel adapter, BitFit) with OpenDelta's outputs exactly.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..core.model import DeltaModel
from . import peft_ia3, peft_ln, peft_lora, peft_prompt
from .adapterhub import import_adapterhub
from .adapterhub_common import AdapterHubFormatError
from .adapterhub_export import export_adapterhub
from .opendelta import OpenDeltaFormatError, import_opendelta
from .peft_common import ENABLED, PeftFormatError, read_folder
from .peft_ia3 import export_peft_ia3, import_peft_ia3
from .peft_layers import FORMATS, export_peft_layers, import_peft_layers
from .peft_ln import export_peft_ln, import_peft_ln
from .peft_lora import export_peft_lora, import_peft_lora
from .peft_prompt import export_peft_prefix, export_peft_prompt, import_peft_prefix, import_peft_prompt

IMPORTERS = {
    "LORA": import_peft_lora,
    "IA3": import_peft_ia3,
    "LN_TUNING": import_peft_ln,
    "PROMPT_TUNING": import_peft_prompt,
    "PREFIX_TUNING": import_peft_prefix,
} | dict.fromkeys(FORMATS, import_peft_layers)
# per PEFT type, the adapter_config.json fields its import knows (honored, or without effect on a trained
# adapter's outputs) and those it refuses by name; any other field that is set is refused (check_fields)
CONFIG_FIELDS = {
    "LORA": (peft_lora._KNOWN, peft_lora._UNSUPPORTED),
    "IA3": (peft_ia3.FIELDS, {}),
    "LN_TUNING": (peft_ln.FIELDS, {}),
    "PROMPT_TUNING": (peft_prompt.PROMPT_FIELDS, {}),
    "PREFIX_TUNING": (peft_prompt.PREFIX_FIELDS, {}),
} | {t: (f.known, f.refuse) for t, f in FORMATS.items()}
EXPORTERS = {
    "lora": export_peft_lora,
    "ia3": export_peft_ia3,
    "layernorm": export_peft_ln,
    "prompt": export_peft_prompt,
    "prefix": export_peft_prefix,
    "dora": export_peft_lora,
} | {f.method: export_peft_layers for f in FORMATS.values()}


def import_peft(
    model: nn.Module, folder: str | os.PathLike, name: str = "default", enabled: bool = True, **kwargs: Any
) -> DeltaModel:
    """Attach the PEFT adapter in `folder` to `model` as a deltatune delta named `name`.

    Every import refuses an adapter_config.json field it does not know that is set (a later PEFT's option
    may change the outputs); `ignore_fields=[...]` names those you know leave them unchanged. Other
    keyword arguments go to the format's importer (`outputs_may_differ` for prompt tuning). A second adapter is
    enabled beside the first, as `dm.add` does (PEFT's `load_adapter` leaves it inactive): `enabled=False` attaches
    it switched off, to serve with `delta_ids` or switch to with `dm.set_active(name)`."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    token = ENABLED.set(enabled)
    try:
        return _import_peft(model, folder, name, **kwargs)
    finally:
        ENABLED.reset(token)


def _import_peft(model: nn.Module, folder: str | os.PathLike, name: str, **kwargs: Any) -> DeltaModel:
    config, _ = read_folder(folder)
    _check_base(config.get("base_model_name_or_path"), model, folder)
    peft_type = config.get("peft_type")
    if peft_type not in IMPORTERS:
        raise PeftFormatError(
            f"PEFT {peft_type!r} adapters have no deltatune equivalent; importable: {', '.join(IMPORTERS)}"
        )
    return IMPORTERS[peft_type](model, folder, name, **kwargs)


def _check_base(saved: Any, model: nn.Module, folder: str | os.PathLike) -> None:
    """An adapter on another checkpoint of the same architecture (bert-base-cased for -uncased) loads without an
    error and computes nonsense. Only hub ids can be compared: a local folder's name says nothing."""
    ours = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not isinstance(saved, str) or not saved or not ours or os.path.isdir(ours) or os.path.isdir(saved):
        return
    if saved.rstrip("/").rsplit("/", 1)[-1].lower() != ours.rstrip("/").rsplit("/", 1)[-1].lower():
        warnings.warn(
            f"{folder}: this adapter was trained on {saved!r}, but the model is {ours!r}; its outputs are meaningful "
            "only on the base model it was trained on",
            stacklevel=3,
        )


def export_peft(dm: DeltaModel, folder: str | os.PathLike, name: str = "default", **kwargs: Any) -> Path:
    """Write the delta `name` as a PEFT adapter folder `PeftModel.from_pretrained` loads."""
    method = dm.delta(name).config.method
    if method not in EXPORTERS:
        raise PeftFormatError(f"{method} has no PEFT equivalent; exportable methods: {', '.join(EXPORTERS)}")
    return EXPORTERS[method](dm, folder, name, **kwargs)


__all__ = [
    "AdapterHubFormatError",
    "CONFIG_FIELDS",
    "EXPORTERS",
    "IMPORTERS",
    "PeftFormatError",
    "OpenDeltaFormatError",
    "export_adapterhub",
    "export_peft",
    "export_peft_ia3",
    "export_peft_layers",
    "export_peft_ln",
    "export_peft_lora",
    "export_peft_prefix",
    "export_peft_prompt",
    "import_adapterhub",
    "import_opendelta",
    "import_peft",
    "import_peft_ia3",
    "import_peft_layers",
    "import_peft_ln",
    "import_peft_lora",
    "import_peft_prefix",
    "import_peft_prompt",
]
