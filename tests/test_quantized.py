"""Deltas on weights quantized in place (torchao's `quantize_`, the CPU and GPU int8 path): trained and
served unmerged, never merged into quantized storage.

torchao replaces each linear weight with a tensor subclass (Int8Tensor) that computes its matmul but takes
no in-place arithmetic. LoRA's merge failed inside torch with "Int8Tensor dispatch: attempting to run
unimplemented operator ... aten.add_", DoRA's attach with the same error for its norm; now the merge is
refused in one line and DoRA reads the dequantized weight (`core.layers.loaded`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import logits, make_inputs, make_model, perturbed

import deltatune as dt

torchao = pytest.importorskip("torchao")


def _quantized() -> torch.nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = make_model("llama", head="lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8WeightOnlyConfig())
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ != "Parameter"
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_delta_on_quantized_weights_starts_as_the_identity_trains_and_refuses_to_merge(method: str) -> None:
    model = _quantized()
    inputs = make_inputs(model)
    base = logits(model, inputs)
    dm = dt.attach(model, method)
    assert (logits(dm, inputs) - base).abs().max() < 1e-5
    dm.train()
    dm(**inputs).loss.backward()
    trained = [n for n, p in dm.named_parameters() if p.grad is not None]
    assert trained and all(n.startswith("deltas.") for n in trained)
    perturbed(dm, scale=0.1)
    out = logits(dm, inputs)
    assert (out - base).abs().max() > 1e-3
    with pytest.raises(
        dt.DeltaError,
        match=r"q_proj.weight is quantized \(Int8Tensor\).*load it onto the model loaded without quantization",
    ):
        dm.merge()
    assert not dm.delta().merged and (logits(dm, inputs) - out).abs().max() < 1e-6


def test_bitfit_merges_into_its_biases_beside_quantized_weights() -> None:
    model = _quantized()
    inputs = make_inputs(model)
    dm = perturbed(dt.attach(model, "bitfit"), scale=0.1)
    out = logits(dm, inputs)
    dm.merge()
    assert (logits(dm, inputs) - out).abs().max() < 1e-5
    dm.unmerge()
    assert (logits(dm, inputs) - out).abs().max() < 1e-5
