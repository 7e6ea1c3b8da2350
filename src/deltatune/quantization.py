"""Loading a backbone quantized by bitsandbytes for training deltas on it (QLoRA: `--quantize 4bit`).

The recipe is QLoRA's (Dettmers et al., 2023): 4-bit NormalFloat weights with their scales quantized
again (double quantization), computing in the run's precision; or LLM.int8() at 8 bits. The task head
stays unquantized: transformers 5 keeps "the last module" out of quantization by the name of its last
*parameter* (`classifier.bias`), which matches no module, so a new classifier was loaded as a 4-bit
layer, random and untrainable. The head's modules are named from a weightless skeleton of the model.
"""

from __future__ import annotations

import importlib.util
from typing import Any

QUANTIZE = ("4bit", "8bit")
INSTALL = "pip install bitsandbytes (or deltatune[quantize])"


def check_quantize(quantize: str | None) -> None:
    """One line for a value `load_backbone` cannot load, and for bitsandbytes missing, before any loading."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: use one of {', '.join(QUANTIZE)}, or None for full precision")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantizing the backbone to {quantize} needs bitsandbytes: {INSTALL}")


def head_modules(cls: Any, path: str, config_kwargs: dict[str, Any]) -> list[str]:
    """The task head's module names (classifier, score, lm_head, ...), from the model built without weights."""
    import transformers as tf
    from accelerate import init_empty_weights

    from .core.targeting import head_names

    config = tf.AutoConfig.from_pretrained(path, **config_kwargs)
    with init_empty_weights():
        skeleton = cls.from_config(config)
    return head_names(skeleton)


def bnb_config(quantize: str, compute_dtype: Any, skip: list[str]) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA's recipe (4bit) or LLM.int8() (8bit), `skip` unquantized."""
    import transformers as tf

    check_quantize(quantize)
    if quantize == "8bit":
        return tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def compute_dtype(mixed_precision: str | None) -> Any:
    """The dtype a 4-bit layer computes in: the run's mixed precision, else float32 (as the rest of the run)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no", torch.float32)


def placement() -> dict[str, Any]:
    """Where a quantized model loads: on a GPU, this process's own (QLoRA's `device_map={"": local rank}`), for
    accelerate trains a bitsandbytes model only on the device it was loaded on; on a CPU, where it is."""
    import os

    import torch

    if not torch.cuda.is_available():
        return {}
    return {"device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
