"""Common-structure aliases (see `aliases.py`) for the transformers that take images: ViT, DINOv2, CLIP and SigLIP.

Whisper (audio in, text out) keeps BART's module names and is mapped there. These models have no token
embedding table where their inputs enter, so prompt tuning is refused on them in one line
(`methods/addition/prompt.py`); prefix tuning takes its width from the config.
"""

from __future__ import annotations

import transformers

_L = r"(?:layer|layers|h|block)\.\d+"  # as aliases.py numbers a transformer block

# ViT: transformers 5 renamed its modules (`vit.layers.N.attention.q_proj`, `mlp.fc1`); 4.57 has BERT's names one level
# down (`vit.encoder.layer.N.attention.attention.query`). Both are mapped; a delta saved under one release names
# modules the other lacks. No token embeddings (`embeddings` is the patch and position embedding).
_VIT = {
    "attn.q": r"(?:layer\.\d+\.attention\.attention\.query|layers\.\d+\.attention\.q_proj)",
    "attn.k": r"(?:layer\.\d+\.attention\.attention\.key|layers\.\d+\.attention\.k_proj)",
    "attn.v": r"(?:layer\.\d+\.attention\.attention\.value|layers\.\d+\.attention\.v_proj)",
    "attn.o": r"(?:layer\.\d+\.attention\.output\.dense|layers\.\d+\.attention\.o_proj)",
    "attn": r"(?:layer\.\d+\.attention\.attention|layers\.\d+\.attention)",
    "ffn.in": r"(?:layer\.\d+\.intermediate\.dense|layers\.\d+\.mlp\.fc1)",
    "ffn.out": r"(?:layer\.\d+\.output\.dense|layers\.\d+\.mlp\.fc2)",
    "ln": r"(?:layernorm_before|layernorm_after|layernorm)",
    "layer": _L,
    "embeddings": r"embeddings",
}

# CLIP: a text and a vision tower with one layout (OPT's names, `mlp.fc1`, `layer_norm1/2`): an alias names both
# towers' modules (`re:text_model\..*` or `re:vision_model\..*` keeps to one).
_CLIP = {
    "attn.q": rf"{_L}\.self_attn\.q_proj",
    "attn.k": rf"{_L}\.self_attn\.k_proj",
    "attn.v": rf"{_L}\.self_attn\.v_proj",
    "attn.o": rf"{_L}\.self_attn\.out_proj",
    "attn": rf"{_L}\.self_attn",
    "ffn.in": rf"{_L}\.mlp\.fc1",
    "ffn.out": rf"{_L}\.mlp\.fc2",
    "ln": r"(?:layer_norm1|layer_norm2|final_layer_norm|pre_layrnorm|post_layernorm)",
    "layer": _L,
    "embeddings": r"(?:token_embedding|position_embedding|patch_embedding)",
    "embeddings.word": r"token_embedding",
}

# DINOv2: the same renaming as ViT but in `encoder.layer.N` at both ends, so 4.57's `layer.N.attention` (the wrapper of
# the self-attention) and 5.x's (the attention itself) are different modules: `attn` is chosen by the release.
_V5 = int(transformers.__version__.split(".")[0]) >= 5
_DINOV2 = {
    "attn.q": r"layer\.\d+\.attention\.(?:attention\.query|q_proj)",
    "attn.k": r"layer\.\d+\.attention\.(?:attention\.key|k_proj)",
    "attn.v": r"layer\.\d+\.attention\.(?:attention\.value|v_proj)",
    "attn.o": r"layer\.\d+\.attention\.(?:output\.dense|o_proj)",
    "attn": r"layer\.\d+\.attention" if _V5 else r"layer\.\d+\.attention\.attention",
    "ffn.in": rf"{_L}\.mlp\.(?:fc1|weights_in)",  # weights_in: the SwiGLU MLP of the giant model
    "ffn.out": rf"{_L}\.mlp\.(?:fc2|weights_out)",
    "ln": r"(?:norm1|norm2|layernorm)",
    "layer": _L,
    "embeddings": r"embeddings",
}

VISION: dict[str, dict[str, str]] = {
    "vit": _VIT,
    "dinov2": _DINOV2,
    # SigLIP (the vision encoder of many vision-language models): CLIP's layout, an attention-pooling head apart
    **dict.fromkeys(("clip", "clip_text_model", "clip_vision_model"), _CLIP),
    **dict.fromkeys(("siglip", "siglip_text_model", "siglip_vision_model"), _CLIP),
}
