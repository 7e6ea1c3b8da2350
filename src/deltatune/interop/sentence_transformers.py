"""sentence-transformers: deltas on a `SentenceTransformer`, trained with its own trainer.

`dm = dt.attach(st, "lora")` attaches to the transformer inside the model (`st.encode` and `dm.encode` then
embed with the deltas), and `SentenceTransformerTrainer(model=dm, ...)` trains the deltas alone, checkpointing
them with `dm.save_pretrained`. What needed care (each measured on all-MiniLM-L6-v2 with LoRA):
- `st.save(dir)` wrote the model without the deltas (reloaded: the base model's embeddings, 0.24 off): it is
  refused while deltas are attached (`core.marks` marks the transformer inside), and `dm.export_merged(dir)`
  writes a merged sentence-transformers folder that `SentenceTransformer(dir)` loads;
- its trainer reloads a checkpoint (`load_best_model_at_end`, `resume_from_checkpoint`) by rebuilding the
  model's class from the folder: 5.x calls `type(model)(folder)` (`core.signed` answers it), 6.x
  `type(model)._load_with_module_classes(folder, ...)`, registered here. Before, the best checkpoint's load
  failed into a logged error and the last step's deltas stayed; a resume stopped on an AttributeError.
`SentenceTransformerTrainer(model=st)` trains nothing, as `Trainer(model=backbone)` (the optimizer does not
hold the deltas): `core.unstepped` warns, and its first checkpoint is refused as above.

`dm.encode(sentences, delta_ids=[...])` embeds each sentence with its own deltas in shared batches (a mixed
batch, `DeltaModel.route`), as do `dm.encode_query`/`dm.encode_document`, with the model's prompts, task and
truncation; on a CrossEncoder `dm.predict(pairs, delta_ids=[...])` scores each pair so. `st.encode` sorts sentences by length and takes no per-row keyword ("called with
additional keyword arguments that this model does not use: ['delta_ids']"), so these batches are made here:
by length, as it does, through the model's own preprocessing and modules.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core.claims import check_routes
from ..core.modes import evaluating
from ..core.registry import CLASS_EXTRAS
from ..core.reload import SavedDeltas
from ..core.routing import row_names

# encode()'s options a mixed batch keeps; any other is refused by name rather than ignored
COMMON = ("batch_size", "convert_to_tensor", "convert_to_numpy", "show_progress_bar", "prompt", "prompt_name")
ROUTED_OPTIONS = (*COMMON, "normalize_embeddings", "truncate_dim", "task")
PREDICT_OPTIONS = (*COMMON, "activation_fn", "apply_softmax")
# options a mixed batch does not take, accepted at their default values (wrappers pass every option along)
DEFAULTS = {"precision": "float32", "output_value": "sentence_embedding", "device": None, "pool": None,
            "chunk_size": None}  # fmt: skip
# encode_query/encode_document: the task they set, and the prompt names they look for, in sentence-transformers' order
SIDES = {"encode_query": ("query", ("query",)), "encode_document": ("document", ("document", "passage", "corpus"))}


def _load_with_module_classes(cls: type, path: str | os.PathLike, *args: Any, **kwargs: Any) -> SavedDeltas:
    """sentence-transformers 6's reload of a checkpoint of the model under training: the deltas it holds."""
    return SavedDeltas(path)


def _features(st: Any, texts: list, prompt: str | None = None, **extra: Any) -> dict[str, torch.Tensor]:
    """The model's own preprocessing (`preprocess` from sentence-transformers 5.x, `tokenize` before), with the
    prompt and task its own encode/predict would use."""
    prepare = getattr(st, "preprocess", None)
    if prepare is not None:
        features = prepare(texts, prompt=prompt, **extra)
    else:
        features = st.tokenize([prompt + t for t in texts] if prompt else texts)
    device = next(st.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def _prompt_and_task(model: Any, kwargs: dict) -> tuple[str | None, dict[str, Any]]:
    """The prompt sentence-transformers applies (a given one, a named one, else the model's default prompt) and
    the task its Router modules read: a routed batch used neither, so its rows were other vectors."""
    prompt, name = kwargs.get("prompt"), kwargs.get("prompt_name")
    resolve = getattr(model, "_resolve_prompt", None)
    prompt = resolve(prompt, name) if resolve is not None else prompt
    return prompt, ({"task": kwargs["task"]} if kwargs.get("task") is not None else {})


def _checked_rows(self: Any, inputs: list, delta_ids: Any, single: bool, args: tuple, kwargs: dict, call: str,
                  options: tuple[str, ...]) -> list:  # fmt: skip
    """One delta_ids entry per input (a name alone: every input), after the options a mixed batch keeps."""
    if single and isinstance(delta_ids, list | tuple) and len(delta_ids) == 1:  # one input, one entry
        delta_ids = delta_ids[0]
    rows = [delta_ids] * len(inputs) if single or isinstance(delta_ids, str) else list(delta_ids)
    size = kwargs.get("batch_size", 32)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {size!r}")
    other = sorted(k for k in set(kwargs) - set(options) if k not in DEFAULTS or kwargs[k] != DEFAULTS[k])
    if args or other:
        raise TypeError(
            f"{call} with delta_ids takes {', '.join(options)} by keyword; not {other or 'positional options'} "
            f"({call} without delta_ids takes every sentence-transformers option)"
        )
    if len(rows) != len(inputs):
        noun = "sentence" if call == "encode" else "pair"
        raise ValueError(f"delta_ids has {len(rows)} entries for {len(inputs)} {noun}s; give one per {noun}")
    if rows:  # checked in the caller's order, before batches reorder rows: row numbers are the caller's
        for names in row_names(rows):
            for name in names:
                self.delta(name)
        check_routes(self.deltas, row_names(rows), self._device())  # whole-batch rules (prompt: one per row)
    return rows


def _plain(self: Any, call: str, *args: Any, **kwargs: Any) -> Any:
    """The model's own `call` without per-row deltas, as a plain call of the DeltaModel: it waits while another
    thread's routed batch holds the deltas' rows (sentence-transformers calls its modules, not `dm.forward`, so
    a plain encode in one thread ran with the other thread's routing: 191 of 200 wrong, no error)."""
    with self._traffic.plain():
        return getattr(self.backbone, call)(*args, **kwargs)


def _length(item: Any) -> int:
    return sum(len(str(x)) for x in item) if isinstance(item, list | tuple) else len(str(item))


def _routed(self: Any, inputs: list, rows: list, kwargs: dict, run: Callable[[list], torch.Tensor]) -> torch.Tensor:
    """`run` over `inputs` in batches of similar length (as sentence-transformers batches them), each input routed
    to its own deltas (`DeltaModel.route`); the outputs stacked in the inputs' order."""
    batch_size = int(kwargs.get("batch_size", 32))
    order = sorted(range(len(inputs)), key=lambda i: -_length(inputs[i]))
    out: list[torch.Tensor | None] = [None] * len(inputs)
    model = self.backbone
    # with flash attention, sentence-transformers 6 packs a batch's texts into one row: rows are routed, so pad
    flat = [m for m in model.modules() if getattr(m, "can_flatten_inputs", False) is True]
    for m in flat:
        m.can_flatten_inputs = False
    try:
        with evaluating(model):  # each module's own mode back afterwards, not the top module's for all
            starts = range(0, len(order), batch_size)
            if kwargs.get("show_progress_bar"):
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="Batches")
            for start in starts:
                chunk = order[start : start + batch_size]
                with torch.no_grad(), self.route([rows[i] for i in chunk]):
                    values = run([inputs[i] for i in chunk])
                for i, value in zip(chunk, values, strict=True):
                    out[i] = value
    finally:
        for m in flat:
            m.can_flatten_inputs = True
    return torch.stack(out) if out else torch.empty(0)  # type: ignore[arg-type]


def _converted(result: torch.Tensor, single: bool, kwargs: dict) -> Any:
    """As sentence-transformers returns it: one tensor (convert_to_tensor), a numpy array (the default), or a
    list of tensors (convert_to_numpy=False)."""
    result = result[0] if single else result
    if kwargs.get("convert_to_tensor"):
        return result
    if not kwargs.get("convert_to_numpy", True):
        return result if single else list(result)
    return result.float().cpu().numpy()


def encode(self: Any, sentences: str | Sequence[str], *args: Any, delta_ids: Any = None, **kwargs: Any) -> Any:
    """`st.encode`; with `delta_ids` (one entry per sentence: a delta name, names, or None), a mixed batch."""
    if delta_ids is None:
        return _plain(self, "encode", sentences, *args, **kwargs)
    single = isinstance(sentences, str)
    texts = [sentences] if single else list(sentences)
    rows = _checked_rows(self, texts, delta_ids, single, args, kwargs, "encode", ROUTED_OPTIONS)
    st = self.backbone
    prompt, task = _prompt_and_task(st, kwargs)
    truncate = kwargs.get("truncate_dim")
    truncate = truncate if truncate is not None else getattr(st, "truncate_dim", None)  # the model's, as st.encode

    def run(batch: list) -> torch.Tensor:
        embedded = st(_features(st, batch, prompt, **task), **task)["sentence_embedding"]
        embedded = embedded[..., :truncate] if truncate else embedded
        return F.normalize(embedded, p=2, dim=1) if kwargs.get("normalize_embeddings") else embedded

    return _converted(_routed(self, texts, rows, kwargs, run), single, kwargs)


def _side(call: str) -> Callable[..., Any]:
    """`st.encode_query` / `st.encode_document`; with `delta_ids`, the routed encode with the prompt and task
    they use (the model's "query" prompt, or "document", "passage", "corpus"). Before, delta_ids was refused."""
    task, names = SIDES[call]

    def side(self: Any, sentences: Any, *args: Any, delta_ids: Any = None, **kwargs: Any) -> Any:
        if delta_ids is None:
            return _plain(self, call, sentences, *args, **kwargs)
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            prompts = getattr(self.backbone, "prompts", None) or {}
            kwargs["prompt_name"] = next((n for n in names if n in prompts), None)
        return encode(self, sentences, *args, delta_ids=delta_ids, **{"task": task, **kwargs})

    side.__name__ = side.__qualname__ = call
    return side


def predict(self: Any, inputs: Any, *args: Any, delta_ids: Any = None, **kwargs: Any) -> Any:
    """`cross_encoder.predict`; with `delta_ids` (one entry per pair: a delta name, names, or None), each pair is
    scored with its own deltas in shared batches: rerankers trained apart, served on one backbone. The scores
    are sentence-transformers' own (its activation, `apply_softmax`, one score per pair for one label)."""
    ce = self.backbone
    if delta_ids is None:
        return _plain(self, "predict", inputs, *args, **kwargs)
    if not isinstance(inputs, list | tuple | str) and not hasattr(inputs, "__len__"):  # a generator: its pairs
        inputs = list(inputs)
    single = ce.is_singular_input(inputs)
    pairs = [list(inputs)] if single else [list(pair) for pair in inputs]
    rows = _checked_rows(self, pairs, delta_ids, single, args, kwargs, "predict", PREDICT_OPTIONS)
    activation = kwargs.get("activation_fn") or ce.activation_fn
    # sentence-transformers 6 squeezes a one-label score before `apply_softmax` (which then leaves it), 5.x after
    squeeze_first = int(importlib.metadata.version("sentence-transformers").split(".")[0]) >= 6
    prompt, _ = _prompt_and_task(ce, kwargs)

    def run(batch: list) -> torch.Tensor:
        scores = ce(_features(ce, batch, prompt))["scores"]
        scores = activation(scores) if activation is not None else scores
        if squeeze_first and ce.num_labels == 1 and scores.ndim > 1:
            scores = scores.squeeze(-1)
        if kwargs.get("apply_softmax") and scores.ndim > 1:
            scores = F.softmax(scores, dim=1)
        return scores.squeeze(-1) if ce.num_labels == 1 and scores.ndim > 1 else scores

    return _converted(_routed(self, pairs, rows, kwargs, run), single, kwargs)


def rank(
    self: Any, query: Any, documents: Any, *args: Any, delta_ids: Any = None, top_k: int | None = None,
    return_documents: bool = False, **kwargs: Any,
) -> Any:  # fmt: skip
    """`cross_encoder.rank`; with `delta_ids` (one entry per document, or one name for all), the documents are
    scored as `predict` scores them, each with its own deltas, and sorted as sentence-transformers sorts them."""
    if delta_ids is None:
        return _plain(self, "rank", query, documents, *args, top_k=top_k, return_documents=return_documents, **kwargs)
    if self.backbone.num_labels != 1:
        raise ValueError("rank() takes a CrossEncoder with num_labels=1 (one score per document); use predict()")
    documents = list(documents)
    scores = predict(self, [[query, doc] for doc in documents], *args, delta_ids=delta_ids, **kwargs)
    results = [
        {"corpus_id": i, "score": float(score)} | ({"text": documents[i]} if return_documents else {})
        for i, score in enumerate(scores)
    ]
    return sorted(results, key=lambda r: r["score"], reverse=True)[:top_k]


def _unrouted(call: str) -> Callable[..., Any]:
    """`call` of a sentence-transformers model whose outputs a routed batch does not reproduce (a SparseEncoder
    keeps the `max_active_dims` largest entries and returns sparse tensors, a MultiVectorEncoder one vector per
    token): delta_ids refused by name rather than answered with other vectors."""

    def method(self: Any, *args: Any, delta_ids: Any = None, **kwargs: Any) -> Any:
        if delta_ids is not None:
            raise TypeError(
                f"{type(self.backbone).__name__}.{call} takes no delta_ids: per-row deltas are served for "
                "SentenceTransformer and CrossEncoder models; encode each delta's rows apart (dm.set_active(name))"
            )
        return _plain(self, call, *args, **kwargs)

    method.__name__ = method.__qualname__ = call
    return method


def class_extras(backbone_cls: type) -> dict[str, Any]:
    """What sentence-transformers' trainer calls on the class of a DeltaModel over one of its models, and
    `encode` with per-sentence deltas."""
    if not backbone_cls.__module__.startswith("sentence_transformers."):
        return {}
    from sentence_transformers import SentenceTransformer

    extras: dict[str, Any] = {"_load_with_module_classes": classmethod(_load_with_module_classes)}
    dense = issubclass(backbone_cls, SentenceTransformer)
    for call in ("encode", *SIDES):
        if callable(getattr(backbone_cls, call, None)):
            extras[call] = (encode if call == "encode" else _side(call)) if dense else _unrouted(call)
    if callable(getattr(backbone_cls, "predict", None)) and callable(getattr(backbone_cls, "is_singular_input", None)):
        extras["predict"] = predict  # a CrossEncoder
        extras["rank"] = rank
    return extras


CLASS_EXTRAS.append(class_extras)
