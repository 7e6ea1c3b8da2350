"""Encoder-decoders beside T5 and BART: Marian (translation), Pegasus (summarization), M2M-100 (NLLB's type),
Blenderbot, Blenderbot-small, PLBart and UMT5. Before, every method but prompt and bitfit was refused on each
("alias 'attn.q' is not mapped for model type 'marian'"); once mapped, prompt tuning failed on the three with
sinusoidal positions that take the input's shape, not its ids (`'torch.Size' object has no attribute 'shape'`).

They keep BART's (or T5's) module names, with what sets them apart: sinusoidal positions (Marian, Pegasus,
M2M-100, scaled embeddings in Marian and M2M-100), norms before each sublayer (Pegasus, M2M-100, Blenderbot),
UMT5's relative position bias in every layer. Held to tests/modern.py's promises with the target sequence as
the decoder's input, and generate() with prompt and prefix against greedy decoding by full forward passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from modern import VOCAB, assert_rows_alone, keeps_promises, logits, make_inputs
from prefix_prompt_helpers import _greedy_seq2seq
from tiny import perturbed

import deltatune as dt
from deltatune.core import registry
from deltatune.core.targeting import resolve

_C = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
_B = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, **_C,
)  # fmt: skip
CONFIGS = {
    "marian": lambda: tf.MarianConfig(**_B),
    "pegasus": lambda: tf.PegasusConfig(**_B),
    "m2m_100": lambda: tf.M2M100Config(**_B),
    "blenderbot": lambda: tf.BlenderbotConfig(**_B),
    "blenderbot-small": lambda: tf.BlenderbotSmallConfig(**_B),
    "plbart": lambda: tf.PLBartConfig(**_B),
    "umt5": lambda: tf.UMT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ),
}  # fmt: skip
METHODS = tuple(sorted(registry.METHODS))
SMALL = {"prefix": {"num_tokens": 3}, "prompt": {"num_tokens": 4}, "random_subset": {"count": 1000}}


def _model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.AutoModelForSeq2SeqLM.from_config(CONFIGS[arch]()).eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", CONFIGS)
def test_methods_keep_their_promises(arch: str, method: str, tmp_path: Path) -> None:
    # float64, as tests/test_arch_classic.py: merged OFT on UMT5 differed from unmerged by 1.6e-5 in float32
    # at 4.57.6 (rounding; the generation tests below run in float32)
    keeps_promises(method, "lm", lambda: _model(arch).double(), tmp_path, **SMALL.get(method, {}))


@pytest.mark.parametrize("arch", CONFIGS)
def test_aliases_name_both_sides(arch: str) -> None:
    model = _model(arch)
    for alias in ("attn", "attn.q", "attn.o", "ffn.out"):
        assert len(resolve(model, f"encoder:{alias}")) == len(resolve(model, f"decoder:{alias}")) == 2, alias
    per_layer = 2 if arch == "umt5" else 1  # UMT5's gated FFN: wi_0 and wi_1
    assert len(resolve(model, "encoder:ffn.in")) == len(resolve(model, "decoder:ffn.in")) == 2 * per_layer
    assert len(resolve(model, "xattn.q")) == 2  # the decoder's cross-attention, one per layer


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("arch", CONFIGS)
def test_generate_equals_greedy_decoding_without_a_cache(arch: str, method: str) -> None:
    dm = perturbed(dt.attach(_model(arch), method, **SMALL[method]), scale=0.5)
    # decode all 6 tokens: no stop at eos, and no eos forced at the last step (Marian's, Pegasus's defaults)
    dm.backbone.generation_config.eos_token_id = dm.backbone.generation_config.forced_eos_token_id = None
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, _greedy_seq2seq(dm, ids, 6))
    inputs = make_inputs(dm.backbone)
    delta = logits(dm, inputs)
    dm.disable("default")
    # Blenderbot-small's post-norm layers keep a perturbed prompt's effect on its logits to 9e-4
    assert (logits(dm, inputs) - delta).abs().max() > 1e-4, "the delta changes nothing: the comparison proves nothing"


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt"])
@pytest.mark.parametrize("arch", CONFIGS)
def test_each_row_of_a_mixed_batch_equals_its_delta_alone(arch: str, method: str) -> None:
    dm = dt.DeltaModel(_model(arch))
    for i, name in enumerate(("a", "b")):
        dm.add(name, dt.get_config(method, **SMALL.get(method, {})), enabled=False)
        perturbed(dm, scale=0.3, seed=i)
    rows = ["a", "b", "b", "a"] if method == "prompt" else ["a", None, "b", "a"]  # a prompt row needs a prompt
    assert_rows_alone(dm, make_inputs(dm.backbone, batch=4), rows)
