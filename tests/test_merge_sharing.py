"""Merges whose weights another module (or another merged delta) also holds.

A merge writes tensors; when a module the delta does not act on holds the same tensor (GPT-2's
`lm_head` tied to `wte`), or another merged delta owns what is written (two BitFit deltas each
adding a bias to one bias-free layer), the merged outputs are no longer the unmerged ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import logits, make_inputs, make_model, state

import deltatune as dt
from deltatune.core.delta import DeltaError


def _perturb(dm: dt.DeltaModel, name: str = "default", scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta(name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("method", ["lora", "ia3", "said"])
def test_a_delta_on_a_tied_lm_head_is_not_merged_into_the_embeddings(method: str, tmp_path: Path) -> None:
    """LoRA merged into GPT-2's lm_head wrote the tied wte too: logits 35 off the unmerged ones, no error."""
    model = make_model("gpt2", "lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    dm = dt.attach(model, dt.METHODS[method](targets=("lm_head",)), train_head=False)
    _perturb(dm)
    before = state(model)
    for act in (dm.merge, lambda: dm.export_merged(tmp_path / "out")):
        with pytest.raises(DeltaError, match=r"lm_head.*also held by transformer\.wte"):
            act()
        assert not dm.delta().merged
        assert all(torch.equal(v, before[k]) for k, v in state(model).items())


def test_a_delta_reparametrizing_every_holder_of_a_tied_tensor_still_merges() -> None:
    model = make_model("gpt2", "lm")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["selective"](targets=("lm_head",), last_k=None), train_head=False)
    _perturb(dm, scale=0.05)
    unmerged = logits(dm, inputs)
    dm.merge()
    torch.testing.assert_close(logits(dm, inputs), unmerged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_bitfit_deltas_adding_a_bias_to_one_layer_do_not_merge_over_each_other(dtype: torch.dtype) -> None:
    """The second merge replaced the first's bias (10 where 1 + 10 was due), and unmerging the first
    then removed the second's: merged outputs wrong, no error."""
    model = make_model("llama").to(dtype)
    dm = dt.attach(model, dt.METHODS["bitfit"](targets=("attn.q",)), name="a", train_head=False)
    dm.add("b", dt.METHODS["bitfit"](targets=("attn.q",)))
    with torch.no_grad():
        for name, value in (("a", 1.0), ("b", 10.0)):
            for p in dm.delta(name).added.values():
                p.fill_(value)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 32, dtype=dtype)
    unmerged = q(x)
    dm.merge("a")
    torch.testing.assert_close(q(x), unmerged)
    with pytest.raises(DeltaError, match=r"q_proj already has a bias that another merged BitFit delta added"):
        dm.merge("b")
    assert not dm.delta("b").merged
    torch.testing.assert_close(q(x), unmerged)  # b's refusal changed nothing
    dm.unmerge("a")
    assert q.bias is None
    dm.disable("a")
    dm.merge("b")  # alone, it merges
    assert torch.equal(q.bias, torch.full_like(q.bias, 10.0))


def test_head_tensors_are_not_loaded_under_a_merged_delta_on_the_head() -> None:
    """Loaded under a bf16 merge of LoRA on the classifier, the head was then overwritten by the copy unmerge
    puts back (the pre-merge head, the loaded one lost; before that copy, loaded - dW), no error."""
    model = make_model("bert").to(torch.bfloat16)
    dm = dt.attach(model, dt.METHODS["lora"](targets=("classifier",)), name="a", train_head=True)
    dm.add("b", dt.METHODS["bitfit"]())
    _perturb(dm, "a")
    dm.merge("a")
    merged = state(model)
    loaded = {
        f"__head__.{n}": torch.full_like(p, 7.0) for n, p in model.named_parameters() if n.startswith("classifier")
    }
    with pytest.raises(DeltaError, match=r"head.*'a' is merged into classifier"):
        dm.load_delta_state_dict("b", {**dm.delta_state_dict("b"), **loaded})
    assert all(torch.equal(v, merged[k]) for k, v in state(model).items())
    dm.load_delta_state_dict("b", dm.delta_state_dict("b"))  # without head tensors: nothing to refuse
    dm.unmerge("a")
    dm.load_delta_state_dict("b", {**dm.delta_state_dict("b"), **loaded})
    assert torch.equal(model.classifier.weight, torch.full_like(model.classifier.weight, 7.0))
