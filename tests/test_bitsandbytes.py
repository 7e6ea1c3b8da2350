"""bitsandbytes' 4-bit and 8-bit models (QLoRA's `load_in_4bit`): deltas on quantized backbones.

Before, every method failed on them: its tensors took the weight's dtype (uint8, int8: "Only Tensors of floating
point and complex dtype can require gradients"), DoRA's norm read packed storage, and after a 4-bit layer's
first CPU forward in eval mode (bitsandbytes repacks its storage, (2048, 1) -> (64, 32)) every delta was
refused as "resized". Methods that train weights entry by entry failed inside torch, or (random subset, SAID)
left the quantized weights out without a word. A delta trained there could not be loaded onto the same model
unquantized, the usual way to merge a QLoRA adapter: it was "another base model".

The tiny BERT is 64 wide: bitsandbytes' CPU 4-bit kernel needs whole blocks of 64 inputs. bitsandbytes on CPU
computes a layer differently in train and eval mode, so each comparison stays in one mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.core.layers import loaded

pytest.importorskip("bitsandbytes")

OUTPUT_SIDE = ["lora", "dora", "ia3", "adapter", "parallel_adapter", "loha", "lokr", "vera", "oft", "adalora",
               "lowrank_adapter", "compacter", "norm_adapter", "bitfit", "layernorm", "prefix", "prompt"]  # fmt: skip
ENTRY_BY_ENTRY = ["diff_pruning", "random_subset", "selective", "said"]
SMALL = {"prefix": {"num_tokens": 3}, "prompt": {"num_tokens": 3}, "random_subset": {"count": 100}}


def _config() -> tf.BertConfig:
    return tf.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    tf.BertForSequenceClassification(_config()).save_pretrained(path)
    return path


def _quantized(folder: Path, bits: int, double: bool = False) -> torch.nn.Module:
    if bits == 4:
        q = tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=double,
            llm_int8_skip_modules=["classifier"],
        )  # fmt: skip
    else:
        q = tf.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    torch.manual_seed(1)  # the classifier is new: the same one on every load
    return tf.AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=q, device_map="cpu")


INPUTS = {"input_ids": torch.tensor([[5, 17, 42, 9, 63, 2, 11], [8, 30, 4, 77, 0, 0, 0]])}
INPUTS["attention_mask"] = (INPUTS["input_ids"] != 0).long()


def _perturb(dm: dt.DeltaModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", OUTPUT_SIDE)
def test_a_delta_on_a_quantized_model_starts_as_the_identity_and_trains_only_its_tensors(
    folder: Path, bits: int, method: str
) -> None:
    base = _quantized(folder, bits).train()
    before = base(**INPUTS).logits.detach()
    dm = dt.attach(base, method, **SMALL.get(method, {})).train()
    trained = [p for p in dm.parameters() if p.requires_grad]
    assert trained and all(p.is_floating_point() for p in trained)
    out = dm(**INPUTS).logits
    if method not in ("prefix", "prompt"):  # their tokens act from the start
        assert torch.equal(out, before)
    out.sum().backward()
    assert all(p.grad is None for p in dm.parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    _perturb(dm)
    assert (dm(**INPUTS).logits - before).abs().max() > 1e-3
    dm.eval()
    with torch.no_grad():  # a 4-bit layer repacks its storage here (CPU): the delta is not "resized"
        dm(**INPUTS)
        dm(**INPUTS)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ENTRY_BY_ENTRY)
def test_methods_that_train_weights_entry_by_entry_are_refused_in_one_line(
    folder: Path, bits: int, method: str
) -> None:
    with pytest.raises(ValueError, match=r"\.weight is quantized \((Params4bit|Int8Params)\), and this method would"):
        dt.attach(_quantized(folder, bits), method, **SMALL.get(method, {}))
    dm = dt.attach(_quantized(folder, bits), "diff_pruning", param_names=("bias",))  # its unquantized tensors: fine
    assert dm.trainable_parameters() > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_a_head_loaded_quantized_is_refused_by_name_when_asked_to_train(folder: Path, bits: int) -> None:
    """transformers 5's own skip rule names "the last module" by its last parameter (`classifier.bias`), so a new
    classifier loaded quantized (4.57 kept it out; an empty skip list quantizes it at both ends); training it
    failed in torch ("only Tensors of floating point dtype...")."""
    key = "load_in_4bit" if bits == 4 else "load_in_8bit"
    q = tf.BitsAndBytesConfig(**{key: True}, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=[])
    model = tf.AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=q, device_map="cpu")
    with pytest.raises(ValueError, match=r"the task head 'classifier' was loaded quantized \(Linear(4bit|8bitLt)\) .*"
                       r"llm_int8_skip_modules=\['classifier'\]\) to keep it unquantized"):  # fmt: skip
        dt.attach(model, "lora", train_head=True)
    dm = dt.attach(model, "lora", train_head=False)
    assert dm.trainable_parameters() == 2 * 2 * (64 * 8 + 8 * 64)


@pytest.mark.parametrize("double", [False, True])
def test_a_4bit_weight_reads_the_same_after_bitsandbytes_repacks_it_for_its_cpu_kernel(
    folder: Path, double: bool
) -> None:
    """DoRA's norm reads the weight (`layers.loaded`). After the first eval forward on CPU, bitsandbytes'
    own `dequantize_4bit` read the repacked storage 26% off; the layout is unpacked first now."""
    model = _quantized(folder, 4, double).eval()
    layer = model.bert.encoder.layer[0].attention.self.query
    full = tf.AutoModelForSequenceClassification.from_pretrained(folder).bert.encoder.layer[0].attention.self.query
    first = loaded(layer).clone()
    assert (first - full.weight).abs().max() < 0.2 * full.weight.abs().max()  # 4-bit rounding, not another tensor
    with torch.no_grad():
        model(**INPUTS)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # the case this test is about
    assert (loaded(layer) - first).abs().max() < 1e-2 * first.abs().max()  # its scales are kept in bf16 there
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert (layer(x) - layer.bias - x @ loaded(layer).T).abs().max() < 1e-2 * layer(x).abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_delta_trained_quantized_merges_on_the_model_loaded_without_quantization(
    folder: Path, bits: int, tmp_path: Path
) -> None:
    """QLoRA's way to serve: train on the quantized model, load the delta onto the full-precision one, merge."""
    dm = dt.attach(_quantized(folder, bits), "lora", r=4)
    _perturb(dm)
    with pytest.raises(dt.DeltaError, match=r"is quantized .* load it onto the model loaded without quantization"):
        dm.merge()
    dm.save_delta(tmp_path / "delta")
    full = tf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    on_full = dt.load_delta(full, tmp_path / "delta")
    saved = {k: v for k, v in dm.state_dict().items() if "deltas." in k}
    assert all(torch.equal(on_full.state_dict()[k], v) for k, v in saved.items())
    with torch.no_grad():
        unmerged = on_full(**INPUTS).logits
        on_full.merge()
        assert (on_full(**INPUTS).logits - unmerged).abs().max() < 1e-5
    torch.manual_seed(7)
    tf.BertForSequenceClassification(_config()).save_pretrained(tmp_path / "other")
    with pytest.raises(dt.DeltaIOError, match="another checkpoint of the same architecture"):
        dt.load_delta(tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "other"), tmp_path / "delta")


@pytest.mark.parametrize("bits", [4, 8])
def test_trainer_trains_the_deltas_of_a_quantized_model(folder: Path, bits: int, tmp_path: Path) -> None:
    """transformers' Trainer refused it: "You cannot perform fine-tuning on purely quantized models. Please attach
    trainable adapters" (it reads `_hf_peft_config_loaded`, which the DeltaModel now answers)."""
    datasets = pytest.importorskip("datasets")
    dm = dt.attach(_quantized(folder, bits), "lora", r=4)
    weights = {n: p.detach().clone() for n, p in dm.backbone.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in dm.named_parameters() if p.requires_grad}
    rows = datasets.Dataset.from_dict({"input_ids": [[5, 17, 42, 9]] * 8, "labels": [0, 1] * 4})
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no",
    )  # fmt: skip
    tf.Trainer(model=dm, args=args, train_dataset=rows).train()
    assert all(not torch.equal(p, start[n]) for n, p in dm.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, weights[n]) for n, p in dm.backbone.named_parameters() if n in weights)


def _tiny_llama(path: Path) -> Path:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(("family", "method"), [("llama", "lora"), ("bert", "bitfit")])
def test_an_evaluation_leaves_a_4bit_model_training_as_before_it(
    family: str, method: str, folder: Path, tmp_path: Path
) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval forward for an inference
    kernel it then takes in training too, which has no backward: after one evaluation a bias-free Llama trained
    with no gradient at all (0 of 8 LoRA tensors, no error), BERT's biases failed inside bitsandbytes, and
    `state_dict()` (which unpacks) moved the outputs of a weight without double quantization 3.5%."""
    q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    if family == "llama":
        model = tf.AutoModelForCausalLM.from_pretrained(_tiny_llama(tmp_path / "llama"), quantization_config=q)
        batch = {"input_ids": torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))}
        batch["labels"] = batch["input_ids"]
    else:
        model = _quantized(folder, 4)
        batch = {**INPUTS, "labels": torch.tensor([0, 1])}
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    dm = dt.attach(model, method)
    _perturb(dm)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dm.train()
        dm.zero_grad()
        out = dm(**batch)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in dm.named_parameters() if p.grad is not None}

    logits, grads = step()
    assert len(grads) == sum(p.requires_grad for p in dm.parameters())
    dm.eval()
    with torch.no_grad():
        dm(**batch)
    dm.state_dict()
    again, grads_again = step()
    assert torch.equal(again, logits) and grads_again.keys() == grads.keys()
    assert all(torch.equal(grads_again[n], g) for n, g in grads.items())
