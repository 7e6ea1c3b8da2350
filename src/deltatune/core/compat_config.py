"""What deltatune reads from transformers configs and converted tokenizers: the config attributes each
architecture family names its sizes by, and the special tokens a GGUF conversion gets wrong.

The attention-level knowledge (KV-cache keywords, masks, positions) is in `core/compat.py`; the two are
the only modules that know how transformers names things.
"""

from __future__ import annotations

from typing import Any


# -- converted backbones --------------------------------------------------------------------------
def tokenizer_as_config(tokenizer: Any, config: Any) -> None:
    """Give a tokenizer converted from a GGUF file the special tokens of the model's config.

    4.57 converts SmolLM2's GGUF tokenizer with eos = bos (<|im_start|>), no pad token and a bos
    prepended to every input; 5.24 takes eos and pad from the config (<|im_end|>) and adds no bos.
    Every release builds the 5.24 tokenizer, so a backbone tokenizes alike across the range.
    """
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False


def attention_heads(model: Any) -> tuple[int, int] | None:
    """(query heads, key/value heads) from the model's (text) config; None where it names no head count.

    Grouped-query models (Llama, Phi-3, Falcon 40B, ...) have fewer key/value heads, multi-query ones one;
    the rest as many as queries.
    GPT-2's n_head is read through the config's attribute map."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        return None
    if getattr(text, "multi_query", False) is True and not getattr(text, "new_decoder_architecture", False):
        return heads, 1  # GPT-BigCode, Falcon-7B: one key/value head (Falcon's new layout counts num_kv_heads)
    for name in ("num_key_value_heads", "num_kv_heads"):  # Llama's name; Falcon's
        kv_heads = getattr(text, name, None)
        if isinstance(kv_heads, int) and not isinstance(kv_heads, bool) and kv_heads > 0:
            return heads, kv_heads
    return heads, heads


# the config attribute each architecture family calls its hidden size by
WIDTH_ATTRIBUTES = ("hidden_size", "d_model", "n_embd", "dim")  # BERT/Llama, T5/BART, GPT-2, DistilBERT


def model_width(model: Any) -> int | None:
    """The model's hidden size from its (text) config; None when it has none."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in WIDTH_ATTRIBUTES:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
