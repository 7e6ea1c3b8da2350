"""Transformers that take no token ids: ViT (images), CLIP and SigLIP (a text and a vision tower), Whisper (audio in,
text out).
Before, every method but bitfit was refused on each ("alias 'attn.q' is not mapped for model type 'vit'"), prompt
tuning failed inside (`'ViTPatchEmbeddings' object has no attribute 'weight'`, Whisper: `too many values to
unpack`) and prefix tuning on ViT read a token table it has not. Held to tests/modern.py's promises on tiny
random models, at both ends of the transformers range: ViT's modules were renamed in transformers 5
(`vit.layers.N.attention.q_proj`, from `vit.encoder.layer.N.attention.attention.query`), and both are mapped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from modern import NUM_LABELS, VOCAB, assert_rows_alone, keeps_promises
from tiny import perturbed

import deltatune as dt
from deltatune.core import registry
from deltatune.core.targeting import resolve

METHODS = tuple(sorted(m for m in registry.METHODS if m != "prompt"))
SMALL = {"prefix": {"num_tokens": 3}, "random_subset": {"count": 1000}}
_G = torch.Generator().manual_seed(1)
PIXELS = torch.randn(2, 3, 16, 16, generator=_G)
AUDIO = torch.randn(2, 8, 32, generator=_G)  # 8 mel bins, 32 frames (Whisper's conv halves them to 16 positions)
TEXT = torch.randint(3, VOCAB, (2, 6), generator=_G)


_IMAGE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16)


def _vit() -> torch.nn.Module:
    return tf.ViTForImageClassification(tf.ViTConfig(**_IMAGE, intermediate_size=64, num_labels=NUM_LABELS))


def _dinov2() -> torch.nn.Module:
    return tf.Dinov2ForImageClassification(tf.Dinov2Config(**_IMAGE, mlp_ratio=2, num_labels=NUM_LABELS))


def _clip() -> torch.nn.Module:
    text = dict(_TEXT, intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = tf.CLIPConfig(text_config=text, vision_config=dict(_IMAGE, intermediate_size=64), projection_dim=16)
    return tf.CLIPModel(config)


def _siglip() -> torch.nn.Module:
    vision = dict(_IMAGE, intermediate_size=64)
    return tf.SiglipModel(tf.SiglipConfig(text_config=dict(_TEXT, intermediate_size=64), vision_config=vision))


def _whisper() -> torch.nn.Module:
    config = tf.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return tf.WhisperForConditionalGeneration(config)


# (build, head, inputs with what makes a loss, attention modules the aliases name)
MODELS = {
    "vit": (_vit, "cls", {"pixel_values": PIXELS, "labels": torch.tensor([0, 2])}, 2),
    "dinov2": (_dinov2, "cls", {"pixel_values": PIXELS, "labels": torch.tensor([0, 2])}, 2),
    "clip": (_clip, "base", {"input_ids": TEXT, "pixel_values": PIXELS, "return_loss": True}, 4),  # both towers
    "siglip": (_siglip, "base", {"input_ids": TEXT, "pixel_values": PIXELS, "return_loss": True}, 4),
    "whisper": (_whisper, "lm", {"input_features": AUDIO, "labels": TEXT}, 4),  # encoder and decoder
}


def _fresh(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[arch][0]().eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", MODELS)
def test_methods_keep_their_promises(arch: str, method: str, tmp_path: Path) -> None:
    _, head, given, _ = MODELS[arch]
    # float64, as tests/test_arch_classic.py: these check which modules and tensors, not float32 rounding; CLIP in
    # float32 (at 4.57.6 the plain model fails in float64: "value cannot be converted to type float without overflow")
    dtype = torch.float32 if arch in ("clip", "siglip") else torch.float64
    given = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in given.items()}
    keeps_promises(method, head, lambda: _fresh(arch).to(dtype), tmp_path, given=given, **SMALL.get(method, {}))


@pytest.mark.parametrize("arch", MODELS)
def test_aliases_name_every_attention_and_prompt_tuning_is_refused_in_one_line(arch: str) -> None:
    model = _fresh(arch)
    attentions = MODELS[arch][3]
    for alias in ("attn", "attn.q", "attn.o", "ffn.in", "ffn.out"):
        assert len(resolve(model, alias)) == attentions, alias
    with pytest.raises(ValueError, match=r"prompt tuning prepends vectors to a stack's token embeddings .* has no "):
        dt.attach(model, "prompt")


def test_prefix_on_clip_text_keeps_its_causal_mask() -> None:
    """CLIP's text tower is causal, passed (4.57) as a mask of its own beside the padding mask, and its attention takes
    no KV cache, so the prefix comes as placeholder rows: both masks must grow by them (4.57 failed on a size). A
    token's state must not depend on later tokens, and must depend on the prefix."""
    torch.manual_seed(0)
    model = tf.CLIPTextModel(_clip().config.text_config).eval()
    dm = dt.attach(model, "prefix", num_tokens=3)
    later = TEXT.clone()
    later[:, 4:] = (later[:, 4:] + 7) % VOCAB
    with torch.no_grad():
        a, b = dm(input_ids=TEXT).last_hidden_state, dm(input_ids=later).last_hidden_state
        dm.disable("default")
        plain = dm(input_ids=TEXT).last_hidden_state
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3
    assert (a[:, 0] - plain[:, 0]).abs().max() > 1e-4, "the first token does not see the prefix"


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3"])
@pytest.mark.parametrize("arch", ["vit", "dinov2", "whisper"])
def test_each_row_of_a_mixed_batch_equals_its_delta_alone(arch: str, method: str) -> None:
    """Serving many deltas in one batch of images or audio: rows are routed by the batch dimension, whatever the
    input is (two rows repeated: four rows, two deltas and the bare model)."""
    dm = dt.DeltaModel(_fresh(arch))
    for i, name in enumerate(("a", "b")):
        dm.add(name, dt.get_config(method), enabled=False)
        perturbed(dm, scale=0.3, seed=i)
    inputs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in MODELS[arch][2].items()}
    assert_rows_alone(dm, inputs, ["a", None, "b", "a"])


def test_a_delta_saved_where_transformers_named_the_modules_otherwise_says_so() -> None:
    """transformers 5 renamed ViT's modules: a ViT delta saved under 4.57.6 names no module of 5.x's ViT (measured by
    hand: saved there, loaded here). The refusal named the same class twice ("trained on ViTForImageClassification
    ... but the model is ViTForImageClassification"); it now names the two releases. Here the other release's file is
    stood in for by its fingerprint with another structure hash."""
    from deltatune.core import identity

    model = _fresh("vit")
    saved = identity.fingerprint(model) | {"structure_sha256": "0" * 64, "transformers": "4.57.6"}
    if tf.__version__ == "4.57.6":
        saved["transformers"] = "5.25.0"
    with pytest.raises(
        identity.IdentityError, match=r"under transformers .* names the same 19,296 parameters otherwise"
    ):
        identity.check(saved, model)
    saved["transformers"] = tf.__version__  # the same release: no rename to blame
    with pytest.raises(identity.IdentityError, match="their parameter names or shapes differ"):
        identity.check(saved, model)
