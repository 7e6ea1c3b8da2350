"""Merging for inference, exporting plain models, combining methods, the delta CLI commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import logits, make_inputs, make_model

import deltatune as dt
from deltatune.core.delta import DeltaError

MERGEABLE = [m for m, cls in dt.METHODS.items() if cls.mergeable]


def _perturb(dm: dt.DeltaModel, name: str = "default", scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta(name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _config(method: str) -> dt.DeltaConfig:
    return dt.METHODS[method](non_linearity="identity") if method == "lowrank_adapter" else dt.METHODS[method]()


@pytest.mark.parametrize("arch,head", [("bert", "cls"), ("gpt2", "lm")])
@pytest.mark.parametrize("method", MERGEABLE)
def test_exported_merged_model_loads_without_deltatune_and_matches(
    method: str, arch: str, head: str, tmp_path: Path
) -> None:
    model = make_model(arch, head)
    inputs = make_inputs(model)
    dm = dt.attach(model, _config(method))
    _perturb(dm)
    expected = logits(dm, inputs)
    dm.export_merged(tmp_path / "merged")
    auto = tf.AutoModelForSequenceClassification if head == "cls" else tf.AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=0, atol=1e-5)
    assert not dm.delta().merged  # exporting leaves the DeltaModel as it was
    torch.testing.assert_close(logits(dm, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["adapter", "prompt", "prefix", "compacter"])
def test_non_mergeable_methods_say_so(method: str, tmp_path: Path) -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS[method]())
    with pytest.raises(dt.DeltaError, match="cannot be merged|no weight change expresses"):
        dm.merge()
    with pytest.raises(dt.DeltaError, match="disable or detach them"):
        dm.export_merged(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_export_refuses_tensors_the_architecture_cannot_hold(tmp_path: Path) -> None:
    dm = dt.attach(make_model("llama", "lm"), dt.METHODS["bitfit"]())  # Llama has no biases: BitFit adds some
    _perturb(dm)
    with pytest.raises(dt.DeltaError, match="no place for"):
        dm.export_merged(tmp_path / "m")


@pytest.mark.parametrize("method", ["lora", "ia3", "said", "bitfit"])
def test_one_hundred_merge_cycles_drift_at_most_1e6(method: str) -> None:
    model = make_model("bert")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm = dt.attach(model, dt.METHODS[method]())
    _perturb(dm, scale=0.3)
    for _ in range(100):
        dm.merge()
        dm.unmerge()
    drift = max(
        (p.detach() - base[n]).abs().max().item() for n, p in model.named_parameters() if ".parametrizations." not in n
    )
    originals = [
        (m.parametrizations[k].original, f"{n}.{k}")
        for n, m in model.named_modules()
        if hasattr(m, "parametrizations")
        for k in m.parametrizations
    ]
    drift = max([drift] + [(t.detach() - base[name]).abs().max().item() for t, name in originals])
    assert drift <= 1e-6


def test_bf16_merge_matches_unmerged_within_bf16_precision() -> None:
    model = make_model("bert").to(torch.bfloat16)
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["lora"]())
    _perturb(dm, scale=0.3)
    unmerged = logits(dm, inputs).float()
    dm.merge()
    merged = logits(dm, inputs).float()
    assert ((merged - unmerged).abs() / unmerged.abs().clamp_min(1e-1)).max() < 1e-2 * 5  # a few bf16 ulps


HALF_MERGEABLE = ["lora", "loha", "lokr", "vera", "adalora", "ia3", "dora", "oft", "bitfit", "said", "random_subset"]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    differ = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not differ, f"{len(differ)} tensors differ after unmerge, e.g. {differ[0]}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", HALF_MERGEABLE)
def test_a_half_precision_unmerge_gives_the_weights_back_bitwise(method: str, dtype: torch.dtype) -> None:
    """Subtracting dW from a rounded W + dW left bf16 LoRA weights 1e-3 off (PEFT's unmerge drifts so too)."""
    model = make_model("bert").to(dtype)
    dm = dt.attach(model, dt.METHODS[method]())
    _perturb(dm, scale=0.3)
    before = _state(model)  # after attaching: a parametrization (BitFit, SAID) renames what it wraps
    for _ in range(3):
        dm.merge()
        dm.unmerge()
    _assert_bitwise(model, before)


def test_half_precision_unmerges_of_shared_weights_are_bitwise_in_reverse_order_and_never_stale() -> None:
    model = make_model("bert").to(torch.bfloat16)
    inputs = make_inputs(model)
    before = _state(model)
    dm = dt.attach(model, dt.METHODS["lora"](), name="a", train_head=False)
    dm.add("b", dt.METHODS["lora"](targets=("attn.q", "attn.k")))  # shares attn.q with a
    _perturb(dm, "a", scale=0.3)
    _perturb(dm, "b", scale=0.3, seed=1)
    dm.merge("a")
    dm.merge("b")
    dm.unmerge("b")
    dm.unmerge("a")
    _assert_bitwise(model, before)
    # out of order: a's copy predates b's merge, so a subtracts; b's copy (taken with a merged) is dropped
    dm.disable("a")
    only_b = logits(dm, inputs).float()
    dm.enable("a")
    dm.merge("a")
    dm.merge("b")
    dm.unmerge("a")
    dm.disable("a")
    torch.testing.assert_close(logits(dm, inputs).float(), only_b, rtol=0, atol=5e-2)  # b merged, by bf16 sums
    dm.unmerge("b")
    drift = max((model.state_dict()[k].float() - v.float()).abs().max().item() for k, v in before.items())
    assert 0 < drift < 0.1  # subtracted (bf16 sums), not a stale copy put back: that would hold a's update (3.0)
    copy = _state(model)
    dm.enable("a")
    dm.merge("a")
    twin = __import__("copy").deepcopy(dm)  # a copy while merged keeps its own way back
    dm.unmerge("a")
    _assert_bitwise(model, copy)
    twin.unmerge("a")
    _assert_bitwise(twin.backbone, copy)


def test_paper_combination_prompt_bitfit_adapter_trains_jointly() -> None:
    model = make_model("roberta")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["prompt"](num_tokens=4), name="prompt", train_head=False)
    dm.add("bitfit", dt.METHODS["bitfit"]())
    dm.add("adapter", dt.METHODS["adapter"]())
    dm(**inputs).loss.backward()
    for name in ("prompt", "bitfit", "adapter"):
        grads = [p.grad for p in dm.delta(name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.parameters())
    total = sum(dm.delta_parameters(n) for n in ("prompt", "bitfit", "adapter"))
    assert dm.trainable_parameters() == total


def test_lora_and_adapter_on_the_same_layers_compose() -> None:
    model = make_model("bert")
    inputs = make_inputs(model)
    dm = dt.attach(model, dt.METHODS["lora"](targets=("attn.o",)), name="lora")
    dm.add("adapter", dt.METHODS["adapter"]())
    _perturb(dm, "lora")
    _perturb(dm, "adapter", seed=1)
    both = logits(dm, inputs)
    dm.set_active("lora")
    lora_only = logits(dm, inputs)
    assert not torch.allclose(both, lora_only)


def test_two_methods_claiming_one_parameter_is_a_clear_error() -> None:
    model = make_model("bert")
    dm = dt.attach(model, dt.METHODS["bitfit"](), name="bitfit")
    with pytest.raises(dt.DeltaError, match="already claimed by another delta.*narrow one of their targets"):
        dm.add("layernorm", dt.METHODS["layernorm"]())
    assert list(dm.deltas) == ["bitfit"]
    assert all(not hasattr(m, "parametrizations") or "weight" not in m.parametrizations for m in model.modules())


def test_cli_inspect_and_merge_a_saved_delta(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from deltatune.cli import main

    model = make_model("bert")
    dm = dt.attach(model, dt.METHODS["lora"]())
    _perturb(dm)
    dm.save_delta(tmp_path / "d", task="toy", task_type="classification", labels=["a", "b", "c"])
    assert main(["inspect", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "lora (reparameterization), 2,048 parameters" in text and "BertForSequenceClassification" in text
    with pytest.raises(DeltaError, match="would write it without its deltas"):  # core.marks
        model.save_pretrained(tmp_path / "backbone")
    dm.disable("default")
    dm.export_merged(tmp_path / "backbone")  # the bare backbone, as the refusal says
    dm.enable("default")
    from tiny import make_tokenizer

    make_tokenizer(["x"]).save_pretrained(tmp_path / "backbone")
    # the saved backbone is the untouched one (LoRA lives in hooks), so the fingerprint matches
    assert main(["merge", str(tmp_path / "backbone"), str(tmp_path / "d"), str(tmp_path / "merged")]) == 0
    plain = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    inputs = make_inputs(model)
    torch.testing.assert_close(logits(plain, inputs), logits(dm, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "bitfit", "prefix"])
def test_the_model_kept_after_attach_refuses_what_would_silently_drop_or_double_its_deltas(
    method: str, tmp_path: Path
) -> None:
    """`model` (the name users keep) with deltas attached: its save_pretrained wrote it without them
    (reloaded 4e-4 off with LoRA, 0.019 with prefix, BitFit's biases re-initialised), and a second attach
    (a notebook cell run twice) ran the first DeltaModel's deltas unseen in the second's outputs."""
    import copy
    import gc

    model = make_model("bert")
    dm = dt.attach(model, dt.METHODS[method]())
    _perturb(dm)
    with pytest.raises(DeltaError, match="would write it without its deltas"):
        model.save_pretrained(tmp_path / "m")
    with pytest.raises(DeltaError, match=rf"already carries deltas of another DeltaModel \('default' \({method}\)\)"):
        dt.attach(model, dt.METHODS["lora"]())
    snapshot = copy.deepcopy(model)  # carries copies of the deltas: refused alike
    with pytest.raises(DeltaError, match="would write it without its deltas"):
        snapshot.save_pretrained(tmp_path / "s")
    with pytest.raises(DeltaError, match="whose DeltaModel is gone"):
        dt.DeltaModel(snapshot)
    assert dm.detach() is model  # the last delta gone: the model is as it came, and saves
    model.save_pretrained(tmp_path / "m")
    dm = dt.attach(model, dt.METHODS[method]())
    del dm
    gc.collect()  # dropped without detach(): its deltas still act on `model`
    with pytest.raises(DeltaError, match="whose DeltaModel is gone"):
        dt.attach(model, dt.METHODS["lora"]())
