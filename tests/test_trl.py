"""A DeltaModel under TRL's SFTTrainer (`peft_config=None`), and the fused LM head it installs.

SFTTrainer (TRL 1.x) replaces the model's `forward` with a fused LM head: for training it runs
`model.base_model` and multiplies the hidden states by `lm_head.weight` itself, never calling
`DeltaModel.forward`. Deltas inside the transformer train exactly as under Trainer; a delta acting on
the LM head through its calls, or one whose loss term `DeltaModel.forward` adds, would train wrongly
without an error and is refused (`core.conventions.check_replaced_forward`). The first tests hold that
refusal to TRL's contract without TRL installed; the others run SFTTrainer itself and skip without it.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny import TOY_WORDS, make_model, make_tokenizer

import deltatune as dt

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (optional)")
LM_HEAD_LORA = {"targets": ("q_proj", "lm_head")}
DROPPED = [("lora", LM_HEAD_LORA), ("adalora", {}), ("diff_pruning", {})]  # what the fused head would lose


def _fused_forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any) -> Any:
    """A stand-in with the signature of TRL's `add_fused_lm_head` forward, the contract deltatune reads."""
    raise AssertionError("not called here")


def _patch(dm: dt.DeltaModel) -> None:
    import types

    dm.forward = types.MethodType(_fused_forward, dm)  # what add_fused_lm_head does


@pytest.mark.parametrize(("method", "settings"), DROPPED, ids=["lora-on-lm_head", "adalora", "diff_pruning"])
def test_a_fused_lm_head_is_refused_for_deltas_it_would_train_wrongly(method: str, settings: dict) -> None:
    dm = dt.attach(make_model("llama", "lm"), dt.get_config(method, **settings))
    with pytest.raises(dt.DeltaError, match=r"fused LM head.*would train wrongly.*transformers\.Trainer\(model=dm"):
        _patch(dm)
    assert "forward" not in vars(dm)


def test_a_fused_lm_head_is_accepted_for_deltas_inside_the_transformer_and_guards_later_ones() -> None:
    dm = dt.attach(make_model("llama", "lm"), "lora")
    dm.add("prompt", "prompt")
    dm.add("bits", "bitfit")
    _patch(dm)
    with pytest.raises(dt.DeltaError, match="acts when the LM head is called"):
        dm.add("head", dt.get_config("lora", **LM_HEAD_LORA))
    assert list(dm.deltas) == ["default", "prompt", "bits"]  # the refused delta is not left attached
    dm.add("more", dt.get_config("lora", targets=("v_proj",)))


# -- TRL itself ------------------------------------------------------------------------------------
def _sft(dm: dt.DeltaModel, out: Path, **kwargs: Any) -> Any:
    import datasets
    import trl

    peft_config = kwargs.pop("peft_config", None)

    texts = ["the movie was great", "the plot was awful", "the cast was fine", "the story was sad"]
    config = dict(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
        report_to=[], disable_tqdm=True, bf16=False, save_steps=3,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL's SFTConfig sets transformers' deprecated aliases
        args = trl.SFTConfig(**(config | kwargs))
        return trl.SFTTrainer(
            model=dm, args=args, train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts * 2]),
            processing_class=make_tokenizer(TOY_WORDS), peft_config=peft_config,
        )  # fmt: skip


def _outputs(dm: dt.DeltaModel) -> torch.Tensor:
    with torch.no_grad():
        return dm.backbone.eval()(input_ids=torch.tensor([[3, 5, 7, 9, 11], [4, 6, 8, 10, 12]])).logits


@needs_trl
@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_sft_trainer_s_loss_is_the_delta_model_s(method: str, tmp_path: Path) -> None:
    model = make_model("llama", "lm")
    dm = dt.attach(model, method)
    trainer = _sft(dm, tmp_path)
    assert trainer.model is dm and "forward" in vars(dm)  # the fused head is installed on the DeltaModel
    with torch.no_grad():
        for p in dm.deltas.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the identity init, where deltas change nothing
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    dm.train()
    fused = trainer.compute_loss(dm, dict(batch))
    own = dm(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(fused, own, rtol=0, atol=1e-5)


@needs_trl
def test_sft_trainer_trains_and_saves_only_the_delta_which_reloads_with_equal_outputs(tmp_path: Path) -> None:
    model = make_model("llama", "lm")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.attach(model, "lora")
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    trainer = _sft(dm, tmp_path)  # TRL's defaults otherwise: gradient checkpointing on
    trainer.train()
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    assert all(not torch.equal(v, before[k]) for k, v in dm.state_dict().items()), "a LoRA tensor did not train"
    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert set(saved) == set(dm.state_dict()) and all(k.startswith("deltas.") for k in saved)
    trainer.save_model(str(tmp_path / "final"))
    fresh = dt.attach(make_model("llama", "lm"), "lora")
    fresh.load_state_dict(load_file(str(tmp_path / "final" / "model.safetensors")))
    torch.testing.assert_close(_outputs(fresh), _outputs(dm), rtol=0, atol=0)
    dm.save_pretrained(tmp_path / "delta")
    again = dt.DeltaModel.from_pretrained(make_model("llama", "lm"), tmp_path / "delta")
    torch.testing.assert_close(_outputs(again), _outputs(dm), rtol=0, atol=0)


@needs_trl
@pytest.mark.parametrize(("method", "settings"), DROPPED, ids=["lora-on-lm_head", "adalora", "diff_pruning"])
def test_sft_trainer_refuses_deltas_its_fused_head_would_drop(method: str, settings: dict, tmp_path: Path) -> None:
    """Measured before the refusal: LoRA's lm_head tensors never moved (loss 0.072 off the model's), AdaLoRA's
    orthogonality (1.6) and diff pruning's L0 penalty (0.0023) were left out of the loss, no error."""
    dm = dt.attach(make_model("llama", "lm"), dt.get_config(method, **settings))
    with pytest.raises(dt.DeltaError, match=r"TRL's fused LM head \(SFTTrainer\)"):
        _sft(dm, tmp_path)


@needs_trl
def test_a_peft_config_given_with_a_delta_model_is_refused_not_trained_beside_it(tmp_path: Path) -> None:
    """SFTTrainer(model=dm, peft_config=config) ran get_peft_model on the DeltaModel: PEFT's LoRA trained beside
    deltatune's and dm.save_pretrained wrote deltatune's only, without an error."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(dt.DeltaError, match=r"PEFT is injecting its layers into a DeltaModel .*Pass peft_config=None"):
        _sft(dt.attach(make_model("llama", "lm"), config), tmp_path, peft_config=config)
    with pytest.raises(dt.DeltaError, match="PEFT is injecting its layers"):
        peft.get_peft_model(dt.attach(make_model("llama", "lm"), "lora"), config)
