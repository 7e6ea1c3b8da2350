"""How a task meets a model (its training objective): batches, loss and predictions for each way of
casting a task.

- `ClassifierObjective`: through the model's sequence-classification head (classes, or one output for
  regression).
- `VerbalizerObjective`: a causal LM classifies by the next-token logits of its label words after a
  prompt (the paper casts every task to text; restricting to the label words is LM-BFF's form).
- `GenerationObjective`: a causal LM learns `source -> target` with the loss on target tokens only,
  and is evaluated on greedy generations.
"Head" means one thing in deltatune: the model's task head, i.e. the classifier weights (`train_head`,
`head_state_dict`, a head-only run); these objectives are not heads, they use one.
Prompt-style deltas may lengthen the sequence inside the model; objectives read positions from the
right end of the logits so that the extra positions never shift what is scored.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..data.tasks import Example, Task


def _cut(ids: list[int], keep: int, tail: int) -> list[int]:
    """At most `keep` tokens of `ids`, always ending with its last `tail` (the cue the answer follows)."""
    if len(ids) <= keep:
        return ids
    return ids[: keep - tail] + ids[-tail:] if keep > tail else ids[-keep:]


def _pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _padded(rows: list[list[int]], pad: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Token rows as one batch: padded to the longest row (on the left for generation, which continues
    at the right end of every row), with the attention mask."""
    width = max(map(len, rows))

    def side(row: list[int], fill: list[int]) -> list[int]:
        return fill + row if left else row + fill

    return {
        "input_ids": torch.tensor([side(r, [pad] * (width - len(r))) for r in rows]),
        "attention_mask": torch.tensor([side([1] * len(r), [0] * (width - len(r))) for r in rows]),
    }


def _texts(examples: Sequence[Example]) -> tuple[list[str], list[str] | None]:
    pairs = [e.text_pair for e in examples]
    return [e.text for e in examples], (pairs if any(p is not None for p in pairs) else None)


def _taken(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the token_type_ids a tokenizer added for a model whose forward names none: BLOOM 4.57
    refuses them ("Got unexpected arguments"), others would take them through **kwargs and ignore them."""
    if "token_type_ids" in batch and "token_type_ids" not in inspect.signature(model.forward).parameters:
        return {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


class ClassifierObjective:
    kind = "cls"

    def __init__(self, task: Task, tokenizer: Any, max_length: int) -> None:
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        self.regression = task.type == "regression"

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts, pairs = _texts(examples)
        pairs = [p or "" for p in pairs] if pairs is not None else None
        batch = self.tokenizer(
            texts, pairs, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
        return dict(batch)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**_taken(model, batch)).loss

    @torch.no_grad()
    def predict(self, model: Any, batch: dict[str, torch.Tensor]) -> list:
        inputs = {k: v for k, v in _taken(model, batch).items() if k != "labels"}
        logits = model(**inputs).logits.float()
        return logits[:, 0].tolist() if self.regression else logits.argmax(-1).tolist()


def _prompt(example: Example) -> str:
    text = example.text if example.text_pair is None else f"{example.text}\n{example.text_pair}"
    return f"{text}\nAnswer:"


class VerbalizerObjective:
    """Label words are the label names; each must start with a distinct token (checked up front)."""

    kind = "lm-cls"

    def __init__(self, task: Task, tokenizer: Any, max_length: int) -> None:
        if task.type == "regression" or not task.labels:
            raise ValueError(f"task {task.name!r} ({task.type}) has no labels to verbalize; use a classification head")
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        ids = [tokenizer(" " + label.replace("_", " "), add_special_tokens=False)["input_ids"] for label in task.labels]
        first = [i[0] for i in ids]
        if len(set(first)) != len(first):
            raise ValueError(
                f"the labels of {task.name!r} ({', '.join(task.labels)}) do not start with distinct tokens; "
                "give the task distinct label words in its meta.json"
            )
        self.label_ids = torch.tensor(first)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        # a long text is cut before its "\nAnswer:", never through it: truncating the whole prompt on the
        # right dropped the cue, and the label words were read as the next word of the text
        tail = len(tok("\nAnswer:", add_special_tokens=False)["input_ids"])
        rows = [_cut(tok(_prompt(e))["input_ids"], self.max_length, tail) for e in examples]
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        return _padded(rows, _pad_id(tok)) | {"labels": labels}

    def _label_logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        # right padding: the last real token sits `pad` positions before the end, whatever came in front
        pad = mask.shape[1] - mask.sum(1)
        last = logits.shape[1] - 1 - pad
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, last][:, self.label_ids.to(logits.device)].float()

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = F.cross_entropy(self._label_logits(model, batch), batch["labels"])
        extra = getattr(getattr(model, "module", model), "regularization", lambda: None)()  # DDP wraps it
        return loss if extra is None else loss + extra  # the model's own loss carries it; this one does not

    @torch.no_grad()
    def predict(self, model: Any, batch: dict[str, torch.Tensor]) -> list:
        return self._label_logits(model, batch).argmax(-1).tolist()


class GenerationObjective:
    kind = "lm-gen"

    def __init__(self, task: Task, tokenizer: Any, max_length: int, max_new_tokens: int = 64) -> None:
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        self.max_new_tokens = max_new_tokens
        self._warned_cut = self._warned_target = False  # each cut is said once per objective
        if tokenizer.eos_token_id is None:
            raise ValueError("generation needs a tokenizer with an end-of-sequence token")

    @staticmethod
    def prompt(example: Example) -> str:
        return f"{example.text}\n"

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        rows, labels = [], []
        for e in examples:
            p = tok(self.prompt(e), add_special_tokens=False)["input_ids"]
            t = tok(str(e.label), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            p, t = self.fit_window(p, t)
            rows.append(p + t)
            labels.append([-100] * len(p) + t)
        return _padded(rows, _pad_id(tok)) | {"labels": _padded(labels, -100)["input_ids"]}

    def fit_window(self, source: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        """Cut a source + target longer than `max_length` in the source's text, keeping its last token
        (the newline the target follows) and at least half the window for the target.

        Cutting the joined sequence at the end, as before, left a long source's row with no target token
        at all: it taught nothing, and a batch of such rows gave a NaN loss that ended the run as diverged.
        """
        room = self.max_length
        if len(source) + len(target) <= room:
            return source, target
        keep = max(room // 2, room - len(source))
        if len(target) > keep and not self._warned_target:  # its end and EOS were trained away without a word
            self._warned_target = True
            warnings.warn(
                f"a source + target of {len(source) + len(target)} tokens is cut to --max-length {room}, its target "
                "too (the end and the EOS token are not trained): raise --max-length to train whole targets",
                stacklevel=2,
            )
        target = target[:keep]
        return _cut(source, room - len(target), 1), target

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    @torch.no_grad()
    def generate(self, model: Any, examples: Sequence[Example]) -> list[str]:
        """Greedy generations of `examples`' sources, in eval mode, with nothing of the checkpoint's own decoding
        settings (its num_beams or repetition_penalty changed the scored outputs; the samples `train` printed
        ran with dropout on, so the saved delta never produced them)."""
        from transformers import GenerationConfig

        from ..core.modes import evaluating

        tok = self.tokenizer
        # a source is kept whole up to `max_length` (training keeps it whole with its target in that window; cut
        # at max_length - max_new_tokens, as before, 14% of WebNLG's test sources lost triples at 128/48)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        keep = self.max_length if not positions else max(1, min(self.max_length, positions - self.max_new_tokens))
        rows = [tok(self.prompt(e), add_special_tokens=False)["input_ids"] for e in examples]
        cut = sum(len(r) > keep for r in rows)
        if cut and not self._warned_cut:
            self._warned_cut = True
            warnings.warn(
                f"{cut} of {len(rows)} sources are longer than {keep} tokens and are cut (their end is lost): raise "
                "--max-length to generate from whole sources",
                stacklevel=2,
            )
        rows = [_cut(r, keep, 1) for r in rows]
        batch = _padded(rows, _pad_id(tok), left=True)
        device = next(model.parameters()).device
        # the checkpoint's own settings are set aside for the call: transformers fills whatever a passed config leaves
        # unset from them (repetition_penalty, no_repeat_ngram_size, ...), so only a clean config is plain greedy
        owner = getattr(model, "backbone", model)  # a DeltaModel generates through its backbone
        own = getattr(owner, "generation_config", None)
        ids = {k: getattr(own, k, None) for k in ("eos_token_id", "bos_token_id", "decoder_start_token_id")}
        ids["eos_token_id"] = ids["eos_token_id"] or tok.eos_token_id
        with evaluating(model):
            owner.generation_config = GenerationConfig(**ids, pad_token_id=_pad_id(tok))
            try:
                out = model.generate(  # ids and mask only: 4.57 refuses the token_type_ids some tokenizers add
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            finally:
                owner.generation_config = own
        width = batch["input_ids"].shape[1]
        return [s.strip() for s in tok.batch_decode(out[:, width:], skip_special_tokens=True)]


def has_lm_head(model: Any) -> bool:
    """Whether a loaded model (or a DeltaModel on it) scores a task through its language-model head (label
    words, generation) rather than a classifier: the one rule fit, the CLI, the study and the subspace use."""
    backbone = getattr(model, "backbone", model)
    return not type(backbone).__name__.endswith("ForSequenceClassification")


def objective_for(task: Task, tokenizer: Any, lm: bool, max_length: int, max_new_tokens: int = 64) -> Any:
    """The objective a (task, model) pair needs: a causal LM verbalizes or generates, an encoder classifies."""
    if task.type == "generation":
        if not lm:
            raise ValueError(f"{task.name!r} is a generation task: use a causal LM backbone such as smollm2-135m")
        return GenerationObjective(task, tokenizer, max_length, max_new_tokens)
    if lm:
        return VerbalizerObjective(task, tokenizer, max_length)
    return ClassifierObjective(task, tokenizer, max_length)
