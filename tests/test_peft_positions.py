"""PEFT prompt and prefix adapters compute PEFT's outputs in deltatune on every architecture.

PEFT numbers its virtual tokens first; imported adapters get `positions="shift"`, which numbers
the same way. Checked against PEFT itself on tiny random models, per real token (PEFT's own
output also holds the prompt positions), for the forward and for greedy generation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny import make_inputs, make_model

import deltatune as dt
from deltatune.core.routing import RoutingError
from deltatune.interop import PeftFormatError, export_peft, import_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

N = 3
TASK = {"cls": "SEQ_CLS", "lm": "CAUSAL_LM", "bare": "FEATURE_EXTRACTION"}
PEFT_CONFIG = {"prompt": "PromptTuningConfig", "prefix": "PrefixTuningConfig"}
# every (arch, head) PEFT runs the method on; "bare": the base model (PEFT prefixes no encoder classifier)
CASES = [
    ("prompt", "bert", "cls"),
    ("prompt", "roberta", "bare"),
    ("prompt", "gpt2", "lm"),
    ("prompt", "llama", "lm"),
    ("prefix", "bert", "bare"),
    ("prefix", "roberta", "bare"),
    ("prefix", "gpt2", "lm"),
    ("prefix", "llama", "lm"),
]


def _model(arch: str, head: str) -> torch.nn.Module:
    model = make_model(arch, "cls" if head == "bare" else head)
    return model.base_model if head == "bare" else model


def _peft_model(kind: str, arch: str, head: str, folder: Path):  # noqa: ANN202 - a peft.PeftModel
    """A PEFT model with a non-trivial adapter (and head), saved to `folder`."""
    config = getattr(peft, PEFT_CONFIG[kind])(num_virtual_tokens=N, task_type=TASK[head])
    pm = peft.get_peft_model(_model(arch, head), config).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    pm.save_pretrained(folder)
    return pm


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], kind: str, real_length: int) -> torch.Tensor:
    """Logits (or hidden states) per real token; PEFT's prompt model also returns the prompt positions."""
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    if out.dim() == 3 and out.shape[1] > real_length:
        out = out[:, out.shape[1] - real_length :]
    return out


def _close_on_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    if a.dim() == 3:
        a, b = a[mask.bool()], b[mask.bool()]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,arch,head", CASES)
def test_imported_prompt_and_prefix_compute_peft_outputs_and_export_back(
    kind: str, arch: str, head: str, tmp_path: Path
) -> None:
    pm = _peft_model(kind, arch, head, tmp_path / "peft")
    inputs = make_inputs(make_model(arch, "cls" if head == "bare" else head))  # right-padded rows
    length = inputs["input_ids"].shape[1]
    theirs = _outputs(pm, inputs, kind, length)
    dm = import_peft(_model(arch, head), tmp_path / "peft")
    assert dm.delta().config.positions == "shift"
    ours = _outputs(dm, inputs, kind, length)
    _close_on_real_tokens(ours, theirs, inputs["attention_mask"])
    # keeping positions instead computes another function on these models: the setting matters
    keep = dt.attach(_model(arch, head), dataclasses.replace(dm.delta().config, positions="keep"))
    keep.delta().load_state_dict(dm.delta().state_dict())
    assert (_outputs(keep, inputs, kind, length) - theirs).abs().max() > 1e-3
    # and PEFT loads what deltatune exports with the same outputs
    export_peft(dm, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(_model(arch, head), tmp_path / "back").eval()
    _close_on_real_tokens(_outputs(back, inputs, kind, length), theirs, inputs["attention_mask"])


def _greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache): the tokens a model's function picks."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_imported_decoder_generates_the_tokens_peft_computes(kind: str, arch: str, tmp_path: Path) -> None:
    """generate() with its KV cache picks what PEFT's forward picks step by step.

    The reference is PEFT's forward, the function the adapter was trained as. PEFT's own generate()
    equals it, and ours, on transformers 4.57.6; on 5.24 (peft 0.21.2) it departs after a few tokens
    for prompt tuning (GPT-2, Llama) and prefix tuning (Llama), so there it is not compared.
    """
    pm = _peft_model(kind, arch, "lm", tmp_path / "peft")
    dm = import_peft(make_model(arch, "lm"), tmp_path / "peft")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = _greedy(pm, ids, 6)
    assert torch.equal(_greedy(dm, ids, 6), expected)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        generated = dm.generate(**kwargs)
        theirs = pm.generate(**kwargs)
    assert torch.equal(generated, expected)
    if transformers.__version__.startswith("4."):
        assert torch.equal(generated, theirs)


def test_shift_is_saved_with_the_delta(tmp_path: Path) -> None:
    for method in ("prompt", "prefix"):
        dm = dt.attach(make_model("gpt2", "lm"), dt.METHODS[method](num_tokens=N, positions="shift"))
        inputs = make_inputs(dm.backbone)
        dm.save_delta(tmp_path / method)
        loaded = dt.load_delta(make_model("gpt2", "lm"), tmp_path / method)
        assert loaded.delta().config.positions == "shift"
        torch.testing.assert_close(_outputs(loaded, inputs, method, 8), _outputs(dm, inputs, method, 8), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "roberta"])
def test_mixed_batch_of_keep_and_shift_prompts_equals_each_alone(arch: str) -> None:
    head = "lm" if arch == "gpt2" else "cls"
    dm = dt.DeltaModel(make_model(arch, head))
    dm.add("keep", dt.METHODS["prompt"](num_tokens=N, seed=1), enabled=False)
    dm.add("shift", dt.METHODS["prompt"](num_tokens=N, seed=2, positions="shift"), enabled=False)
    inputs = make_inputs(dm.backbone, batch=4)
    ids = ["keep", "shift", "shift", "keep"]
    with torch.no_grad():
        mixed = dm(**{k: v for k, v in inputs.items() if k != "labels"}, delta_ids=ids).logits
    for i, name in enumerate(ids):
        dm.set_active(name)
        alone = _outputs(dm, inputs, "prompt", 8)
        _close_on_real_tokens(mixed[i : i + 1], alone[i : i + 1], inputs["attention_mask"][i : i + 1])


def test_mixed_keep_and_shift_prompts_on_a_model_numbering_by_length_are_refused() -> None:
    dm = dt.DeltaModel(make_model("bart"))
    dm.add("keep", dt.METHODS["prompt"](num_tokens=N), enabled=False)
    dm.add("shift", dt.METHODS["prompt"](num_tokens=N, positions="shift"), enabled=False)
    inputs = make_inputs(dm.backbone)
    with pytest.raises(RoutingError, match="'keep' and 'shift'"):
        dm(**{k: v for k, v in inputs.items() if k != "labels"}, delta_ids=["keep", "shift"])


def test_exporting_a_keep_delta_where_positions_matter_is_refused(tmp_path: Path) -> None:
    dm = dt.attach(make_model("llama", "lm"), dt.METHODS["prompt"](num_tokens=N))
    with pytest.raises(PeftFormatError, match="positions='shift'"):
        export_peft(dm, tmp_path / "keep")
    export_peft(dm, tmp_path / "anyway", positions_may_differ=True)
    dm = dt.attach(make_model("t5", "lm"), dt.METHODS["prompt"](num_tokens=N))
    export_peft(dm, tmp_path / "t5")  # relative positions: keep and shift are one function


@pytest.mark.parametrize("arch", ["roberta", "gpt2"])
def test_prompt_classifiers_that_pool_a_position_are_refused(arch: str, tmp_path: Path) -> None:
    """PEFT's classifier pools a virtual token (RoBERTa) or the last position (GPT-2); ours the real tokens."""
    _peft_model("prompt", arch, "cls", tmp_path / "peft")
    with pytest.raises(PeftFormatError, match="outputs_may_differ=True"):
        import_peft(make_model(arch), tmp_path / "peft")
    dm = import_peft(make_model(arch), tmp_path / "peft", outputs_may_differ=True)
    assert dm.delta().config.positions == "shift"


def test_positions_setting_is_checked() -> None:
    for method in ("prompt", "prefix"):
        with pytest.raises(ValueError, match="positions must be one of keep, shift"):
            dt.attach(make_model("bert"), dt.METHODS[method](positions="peft"))
