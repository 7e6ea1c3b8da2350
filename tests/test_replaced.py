"""A module resized or replaced after attaching: the delta on it is refused at the next forward, not lost.

`resize_token_embeddings` after attaching (users add a pad or chat token) builds a new LM head on Llama and
resizes the tied one's weight in place on GPT-2. Before, LoRA on Llama's `lm_head` silently stopped acting
(logits 15.3 off the model's before the resize, on the old vocabulary) and GPT-2 failed inside the hook with
torch's "shape '[-1, 100]' is invalid". Deltas elsewhere keep working through a resize.
"""

from __future__ import annotations

import pytest
import torch
from tiny import logits, make_inputs, make_model, perturbed
from torch import nn

import deltatune as dt
from deltatune.core.delta import DeltaError


def test_lora_on_a_head_that_resize_replaced_is_refused_on_every_call_path() -> None:
    model = make_model("llama", head="lm")
    inputs = make_inputs(model)
    dm = perturbed(dt.attach(model, dt.LoRAConfig(r=4, targets=["lm_head", "q_proj"])))
    with pytest.raises(
        DeltaError, match=r"resize_token_embeddings with delta\(s\) 'default' \(lora\) on the embeddings"
    ):
        model.resize_token_embeddings(model.config.vocab_size + 4, mean_resizing=False)  # refused where it is asked
    type(model).resize_token_embeddings(model, model.config.vocab_size + 4, mean_resizing=False)  # the guard passed by
    message = r"delta 'default' \(lora\) acts on lm_head, which was replaced after attaching .*attach it again"
    for call in (
        lambda: dm(**inputs),
        lambda: model(**inputs),
        lambda: dm.generate(inputs["input_ids"], max_new_tokens=2),
    ):
        with pytest.raises(DeltaError, match=message):
            call()
    dm.disable()  # off, it computes nothing with the old head: the backbone runs
    assert logits(dm, inputs).shape[-1] == model.config.vocab_size
    dm.enable()
    model = dm.detach()  # and it comes off cleanly
    assert not model._forward_pre_hooks


def test_lora_on_a_tied_head_resized_in_place_names_both_shapes() -> None:
    model = make_model("gpt2", head="lm")
    dm = perturbed(dt.attach(model, dt.LoRAConfig(r=4, targets=["lm_head", "c_attn"])))
    with pytest.raises(DeltaError, match=r"resize_token_embeddings with delta\(s\) 'default' \(lora\)"):
        model.resize_token_embeddings(model.config.vocab_size + 4, mean_resizing=False)
    type(model).resize_token_embeddings(model, model.config.vocab_size + 4, mean_resizing=False)  # the guard passed by
    with pytest.raises(DeltaError, match=r"built for lm_head.weight of shape \(100, 32\), which is now \(104, 32\)"):
        dm(**make_inputs(model))


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix", "bitfit", "adapter"])
def test_deltas_away_from_the_embeddings_and_head_keep_working_through_a_resize(method: str) -> None:
    model = make_model("llama", head="lm")
    inputs = make_inputs(model)
    dm = perturbed(dt.attach(model, method))
    before = logits(dm, inputs)
    model.resize_token_embeddings(model.config.vocab_size + 4, mean_resizing=False)
    after = logits(dm, inputs)
    assert after.shape[-1] == before.shape[-1] + 4
    assert (after[..., : before.shape[-1]] - before).abs().max() < 1e-6


def test_resizing_before_attaching_is_the_way() -> None:
    model = make_model("llama", head="lm")
    model.resize_token_embeddings(model.config.vocab_size + 4, mean_resizing=False)
    dm = perturbed(dt.attach(model, dt.LoRAConfig(r=4, targets=["lm_head"])))
    dm.disable()
    base = logits(dm, make_inputs(model))
    dm.enable()
    assert (logits(dm, make_inputs(model)) - base).abs().max() > 1e-3  # the delta acts on the new head


def test_a_targeted_module_replaced_by_assignment_is_refused() -> None:
    model = make_model("bert")
    dm = perturbed(dt.attach(model, dt.LoRAConfig(r=4)))
    model.bert.encoder.layer[0].attention.self.query = nn.Linear(32, 32)
    with pytest.raises(DeltaError, match=r"acts on bert.encoder.layer.0.attention.self.query, which was replaced"):
        dm(**make_inputs(model))


def test_quantizing_after_attaching_is_refused_and_a_quantized_layer_is_named_as_one() -> None:
    """torch's `quantize_dynamic` (the CPU speed-up) swaps every nn.Linear for a quantized layer also called Linear."""
    quantize = torch.ao.quantization.quantize_dynamic
    model = make_model("bert")
    dm = dt.attach(model, dt.LoRAConfig(r=4))
    with pytest.warns(Warning):  # torch's deprecation notice for eager-mode quantization
        quantize(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    with pytest.raises(
        DeltaError, match=r"attention.self.query, which was replaced after attaching \(.*quantize_dynamic"
    ):
        dm(**make_inputs(model))
    with pytest.warns(Warning):
        quantized = quantize(make_model("bert"), {nn.Linear}, dtype=torch.qint8)
    for method in ("lora", "ia3", "dora", "parallel_adapter"):
        with pytest.raises(
            ValueError, match=r"is a Linear \(torch.ao.nn.quantized.dynamic.*quantize after merge_and_unload"
        ):
            dt.attach(quantized, method)


def test_a_module_wrapped_in_place_still_calls_the_delta_and_is_accepted() -> None:
    """A wrapper put in a module's place that calls it (as PEFT's layer calls its `base_layer`) keeps deltatune's
    hooks firing; a new parameter of the same shape (weights assigned) leaves the delta fitting."""

    class Wrapper(nn.Module):
        def __init__(self, base_layer: nn.Module) -> None:
            super().__init__()
            self.base_layer = base_layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base_layer(x)

    model = make_model("llama", head="lm")
    inputs = make_inputs(model)
    dm = perturbed(dt.attach(model, dt.LoRAConfig(r=4)))
    before = logits(dm, inputs)
    attn = model.model.layers[0].self_attn
    attn.q_proj = Wrapper(attn.q_proj)
    assert (logits(dm, inputs) - before).abs().max() < 1e-6
    q = attn.q_proj.base_layer
    q.weight = nn.Parameter(q.weight.detach().clone())
    assert (logits(dm, inputs) - before).abs().max() < 1e-6


def test_peft_injected_into_the_model_or_the_delta_model_is_refused() -> None:
    """get_peft_model on the DeltaModel (as SFTTrainer(model=dm, peft_config=...) does) or on the model the deltas
    were attached to: PEFT's adapter trained beside the deltas and was left out of their saves, without an error."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(DeltaError, match="PEFT is injecting its layers into a DeltaModel"):
        peft.get_peft_model(dt.attach(make_model("llama", head="lm"), dt.LoRAConfig(r=4)), config)
    model = make_model("llama", head="lm")
    dm = dt.attach(model, dt.LoRAConfig(r=4))
    wrapped = peft.get_peft_model(model, config)
    for call in (lambda: dm(**make_inputs(model)), lambda: wrapped(**make_inputs(model))):
        with pytest.raises(DeltaError, match=r"PEFT injected its layers into this model after deltas were attached"):
            call()


def test_a_parameter_sharded_in_place_keeping_its_shape_as_ds_shape_is_not_taken_for_a_resize() -> None:
    """DeepSpeed ZeRO-3 empties each parameter's storage between forwards and records its shape as `ds_shape`."""
    from deltatune.core import replaced

    model = make_model("llama", head="lm")
    dm = dt.attach(model, dt.LoRAConfig(r=4, targets=["q_proj"]))
    q = model.model.layers[0].self_attn.q_proj.weight
    q.ds_shape, q.data = q.shape, torch.empty(0)
    replaced.check(dm.deltas)  # no error
    del q.ds_shape
    with pytest.raises(DeltaError, match=r"q_proj.weight of shape \(32, 32\), which is now \(0,\)"):
        replaced.check(dm.deltas)
