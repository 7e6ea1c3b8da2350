"""What a generation task's scores are computed from: greedy outputs in eval mode whatever the checkpoint's own
decoding settings, and answers that are not blank."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import NOUNS, TOY_WORDS, make_tokenizer

import deltatune as dt
from deltatune.data import DataError, Example, Task, load_task
from deltatune.train import objective_for


@pytest.fixture
def tokenizer():  # noqa: ANN201
    return make_tokenizer(TOY_WORDS)


def _gpt2(tokenizer, dropout: float = 0.0) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=dropout,
        embd_pdrop=dropout, attn_pdrop=dropout, pad_token_id=0, eos_token_id=2, bos_token_id=2,
    )  # fmt: skip
    return tf.GPT2LMHeadModel(config)


EXAMPLES = [Example(f"name {w}", None, f"eat {w}") for w in NOUNS[:3]]


def test_generations_run_in_eval_mode_whatever_mode_the_model_is_in(tokenizer) -> None:  # noqa: ANN001
    """`fit` leaves the model in train mode: the samples `deltatune train` printed ran with dropout, so the saved
    delta never produced them."""
    dm = dt.attach(_gpt2(tokenizer, dropout=0.3), "lora")
    objective = objective_for(Task("g", "generation", None), tokenizer, lm=True, max_length=16)
    objective.max_new_tokens = 6
    dm.eval()
    expected = objective.generate(dm, EXAMPLES)
    dm.train()
    assert [objective.generate(dm, EXAMPLES) for _ in range(3)] == [expected] * 3
    assert dm.training  # the caller's mode is given back


@pytest.mark.parametrize("setting", [{"num_beams": 4}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 1}])
def test_scores_are_of_greedy_generations_whatever_the_checkpoint_s_decoding_settings(tokenizer, setting: dict) -> None:  # noqa: ANN001
    model = _gpt2(tokenizer)
    objective = objective_for(Task("g", "generation", None), tokenizer, lm=True, max_length=16)
    objective.max_new_tokens = 6
    expected = objective.generate(model, EXAMPLES)
    for key, value in setting.items():
        setattr(model.generation_config, key, value)
    assert objective.generate(model, EXAMPLES) == expected  # before: the checkpoint's settings changed them


def test_blank_generation_targets_are_refused_and_a_test_file_of_them_is_left_out(tmp_path: Path) -> None:
    folder = tmp_path / "gen"
    folder.mkdir()
    rows = [{"source": f"name {w}", "target": f"eat {w}"} for w in NOUNS]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r | {"target": ""}) for r in rows) + "\n")
    with pytest.warns(UserWarning, match="has no labels, so it is not loaded as the test split"):
        task = load_task(folder)  # hidden answers: every prediction was scored against "" (BLEU 0)
    assert "test" not in task.splits
    (folder / "test.jsonl").unlink()
    (folder / "dev.jsonl").write_text(json.dumps(rows[0] | {"target": "  "}) + "\n")
    with pytest.raises(DataError, match=r"dev.jsonl, line 1: 'target' is blank"):  # trained on EOS alone
        load_task(folder)


def test_a_target_cut_to_the_window_is_said_once(tokenizer) -> None:  # noqa: ANN001
    """E2E at --max-length 64: 1,083 of 3,000 targets lost their end and EOS in training, no word."""
    objective = objective_for(Task("g", "generation", None), tokenizer, lm=True, max_length=8)
    long = Example("dull", None, " ".join(["the film was"] * 4))
    with pytest.warns(UserWarning, match="is cut to --max-length 8, its target too"):
        objective.collate([long, long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective.collate([long])  # said once per objective


def test_a_head_only_run_on_a_causal_lm_says_it_has_no_head_to_train(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from deltatune.train import TrainConfig, fit

    folder = tmp_path / "gen"
    folder.mkdir()
    rows = [{"source": f"name {w}", "target": f"eat {w}"} for w in NOUNS]
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="language-model head, which stays frozen .* --method lora"):
        fit(
            _gpt2(tokenizer),
            tokenizer,
            load_task(folder),
            [],
            TrainConfig(max_steps=1, progress=False),
            train_head=True,
        )
