"""Common-structure aliases: one vocabulary (`attn.q`, `ffn.out`, ...) over many architectures.

Each table maps an alias to a regular expression matched against the *tail* of a module's
qualified name, so the same table serves `BertModel` and `BertForSequenceClassification`
(whose names carry a `bert.` prefix). Fused projections (GPT-2's `c_attn`, Phi-3's `qkv_proj`,
ModernBERT's `Wqkv`) are the honest answer for `attn.q`/`attn.k`/`attn.v`: there is no separate query
module to target, and a method on it adapts all three (PEFT's defaults pick the same layers). A fused
projection lays out q|k|v one after the other (prefix tuning splits it so, by the config's query and
key/value head counts) unless its model type is in `INTERLEAVED`: there no slice of it is "the keys".

`attn` and `xattn` name the attention modules themselves (what prefix tuning hooks);
`head` is not in the tables: it is derived from `base_model_prefix` for every model.
"""

from __future__ import annotations

from .aliases_vision import VISION

_L = r"(?:layer|layers|h|block)\.\d+"

_BERT = {
    "attn.q": rf"{_L}\.attention\.self\.query",
    "attn.k": rf"{_L}\.attention\.self\.key",
    "attn.v": rf"{_L}\.attention\.self\.value",
    "attn.o": rf"{_L}\.attention\.output\.dense",
    "attn": rf"{_L}\.attention\.self",
    "xattn.q": rf"{_L}\.crossattention\.self\.query",
    "xattn.k": rf"{_L}\.crossattention\.self\.key",
    "xattn.v": rf"{_L}\.crossattention\.self\.value",
    "xattn.o": rf"{_L}\.crossattention\.output\.dense",
    "xattn": rf"{_L}\.crossattention\.self",
    "ffn.in": rf"{_L}\.intermediate\.dense",
    "ffn.out": rf"{_L}\.output\.dense",
    "ln": r"LayerNorm",
    "layer": _L,
    "embeddings": r"embeddings",
    "embeddings.word": r"embeddings\.word_embeddings",
}

_MPNET = {
    "attn.q": rf"{_L}\.attention\.attn\.q",
    "attn.k": rf"{_L}\.attention\.attn\.k",
    "attn.v": rf"{_L}\.attention\.attn\.v",
    "attn.o": rf"{_L}\.attention\.attn\.o",
    "attn": rf"{_L}\.attention\.attn",
    "ffn.in": rf"{_L}\.intermediate\.dense",
    "ffn.out": rf"{_L}\.output\.dense",
    "ln": r"LayerNorm",
    "layer": _L,
    "embeddings": r"embeddings",
    "embeddings.word": r"embeddings\.word_embeddings",
}

# DeBERTa v2/v3: BERT's layout with `*_proj` names; `pos_query_proj`/`pos_key_proj` (disentangled position
# projections) are not attn.q/attn.k. `ln` keeps to the norms on the residual stream, not v3's norm of the
# relative position embeddings (`encoder.LayerNorm`), which are embeddings too.
_DEBERTA_V2 = {
    "attn.q": rf"{_L}\.attention\.self\.query_proj",
    "attn.k": rf"{_L}\.attention\.self\.key_proj",
    "attn.v": rf"{_L}\.attention\.self\.value_proj",
    "attn.o": rf"{_L}\.attention\.output\.dense",
    "attn": rf"{_L}\.attention\.self",
    "ffn.in": rf"{_L}\.intermediate\.dense",
    "ffn.out": rf"{_L}\.output\.dense",
    "ln": rf"(?:embeddings|{_L}\.attention\.output|{_L}\.output)\.LayerNorm",
    "layer": _L,
    "embeddings": r"(?:embeddings|encoder\.rel_embeddings)",
    "embeddings.word": r"embeddings\.word_embeddings",
}

_DISTILBERT = {
    "attn.q": rf"{_L}\.attention\.q_lin",
    "attn.k": rf"{_L}\.attention\.k_lin",
    "attn.v": rf"{_L}\.attention\.v_lin",
    "attn.o": rf"{_L}\.attention\.out_lin",
    "attn": rf"{_L}\.attention",
    "ffn.in": rf"{_L}\.ffn\.lin1",
    "ffn.out": rf"{_L}\.ffn\.lin2",
    "ln": r"(?:sa_layer_norm|output_layer_norm|LayerNorm)",
    "layer": _L,
    "embeddings": r"embeddings",
    "embeddings.word": r"embeddings\.word_embeddings",
}

_GPT2 = {
    "attn.q": rf"{_L}\.attn\.c_attn",
    "attn.k": rf"{_L}\.attn\.c_attn",
    "attn.v": rf"{_L}\.attn\.c_attn",
    "attn.o": rf"{_L}\.attn\.c_proj",
    "attn": rf"{_L}\.attn",
    "xattn.q": rf"{_L}\.crossattention\.q_attn",
    "xattn.k": rf"{_L}\.crossattention\.c_attn",
    "xattn.v": rf"{_L}\.crossattention\.c_attn",
    "xattn.o": rf"{_L}\.crossattention\.c_proj",
    "xattn": rf"{_L}\.crossattention",
    "ffn.in": rf"{_L}\.mlp\.c_fc",
    "ffn.out": rf"{_L}\.mlp\.c_proj",
    "ln": r"(?:ln_1|ln_2|ln_f|ln_cross_attn)",
    "layer": _L,
    "embeddings": r"(?:wte|wpe)",
    "embeddings.word": r"wte",
}

_LLAMA = {
    "attn.q": rf"{_L}\.self_attn\.q_proj",
    "attn.k": rf"{_L}\.self_attn\.k_proj",
    "attn.v": rf"{_L}\.self_attn\.v_proj",
    "attn.o": rf"{_L}\.self_attn\.o_proj",
    "attn": rf"{_L}\.self_attn",
    "ffn.in": rf"{_L}\.mlp\.(?:gate_proj|up_proj)",
    "ffn.out": rf"{_L}\.mlp\.down_proj",
    "ln": r"(?:input_layernorm|post_attention_layernorm|norm)",
    "layer": _L,
    "embeddings": r"embed_tokens",
    "embeddings.word": r"embed_tokens",
}

# Qwen3 and OLMo 2 (and Gemma 3) also normalise queries and keys per head (`q_norm`, `k_norm`); `ln` keeps
# to the norms on the residual stream, as on Llama: those are reachable by name ('re:.*\.[qk]_norm').
_GEMMA3 = _LLAMA | {
    "ln": r"(?:input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm|norm)",
}

_OLMO2 = _LLAMA | {"ln": r"(?:post_attention_layernorm|post_feedforward_layernorm|norm)"}  # norms after sublayers
# Apertus: Llama's names but its norms' (`attention_layernorm`, `feedforward_layernorm`), and no gate projection
_APERTUS = _LLAMA | {"ln": r"(?:attention_layernorm|feedforward_layernorm|norm)"}

# Phi-3 fuses q|k|v into `qkv_proj` and gate|up into `gate_up_proj`: the fused layer is the honest answer.
_PHI3 = _LLAMA | {
    "attn.q": rf"{_L}\.self_attn\.qkv_proj",
    "attn.k": rf"{_L}\.self_attn\.qkv_proj",
    "attn.v": rf"{_L}\.self_attn\.qkv_proj",
    "ffn.in": rf"{_L}\.mlp\.gate_up_proj",
}

# ModernBERT fuses q|k|v into `Wqkv` and input|gate into `Wi`. Its first layer's `attn_norm` is an
# nn.Identity (the embeddings' norm comes just before): `ln` names the real norms only; the head's norm
# belongs to the head.
_MODERNBERT = {
    "attn.q": rf"{_L}\.attn\.Wqkv",
    "attn.k": rf"{_L}\.attn\.Wqkv",
    "attn.v": rf"{_L}\.attn\.Wqkv",
    "attn.o": rf"{_L}\.attn\.Wo",
    "attn": rf"{_L}\.attn",
    "ffn.in": rf"{_L}\.mlp\.Wi",
    "ffn.out": rf"{_L}\.mlp\.Wo",
    "ln": r"(?:embeddings\.norm|layers\.[1-9]\d*\.attn_norm|layers\.\d+\.mlp_norm|final_norm)",
    "layer": _L,
    "embeddings": r"embeddings",
    "embeddings.word": r"embeddings\.tok_embeddings",
}

# Gemma 2 has Gemma 3's four norms per layer (around each sublayer, before and after).
_GEMMA2 = _GEMMA3

# Phi-2 runs attention and MLP in parallel off one `input_layernorm`; attention's output is `dense`.
# With qk_layernorm its per-head `q_layernorm`/`k_layernorm` stay out of `ln`, as Qwen3's q_norm does.
_PHI = _LLAMA | {
    "attn.o": rf"{_L}\.self_attn\.dense",
    "ffn.in": rf"{_L}\.mlp\.fc1",
    "ffn.out": rf"{_L}\.mlp\.fc2",
    "ln": r"(?:input_layernorm|final_layernorm)",
}

# StarCoder2: Llama's attention and norms (LayerNorm, with biases), a plain two-layer MLP.
_STARCODER2 = _LLAMA | {"ffn.in": rf"{_L}\.mlp\.c_fc", "ffn.out": rf"{_L}\.mlp\.c_proj"}

# OPT: BART's decoder layer without cross-attention (`xattn` refused by name, not an empty selection);
# `final_layer_norm` names each layer's FFN norm and the decoder's last norm. Learned positions are
# embeddings too; `project_in`/`project_out` (OPT-350m's narrower embeddings) are projections, not embeddings.
_OPT = {
    "attn.q": rf"{_L}\.self_attn\.q_proj",
    "attn.k": rf"{_L}\.self_attn\.k_proj",
    "attn.v": rf"{_L}\.self_attn\.v_proj",
    "attn.o": rf"{_L}\.self_attn\.out_proj",
    "attn": rf"{_L}\.self_attn",
    "ffn.in": rf"{_L}\.fc1",
    "ffn.out": rf"{_L}\.fc2",
    "ln": r"(?:self_attn_layer_norm|final_layer_norm)",
    "layer": _L,
    "embeddings": r"(?:embed_tokens|embed_positions)",
    "embeddings.word": r"embed_tokens",
}

# GPT-NeoX (Pythia) fuses q|k|v into `query_key_value` head by head (q, k, v of head 0, then head 1, ...), not
# one after the other (INTERLEAVED): attn.q/attn.k/attn.v name the whole fused layer, as GPT-2's `c_attn`, and
# prefix tuning takes its keys' width from the config, as this attention takes a KV cache. Attention and MLP
# run in parallel by default, each with its norm.
_GPT_NEOX = {
    **dict.fromkeys(("attn.q", "attn.k", "attn.v"), rf"{_L}\.attention\.query_key_value"),
    "attn.o": rf"{_L}\.attention\.dense",
    "attn": rf"{_L}\.attention",
    "ffn.in": rf"{_L}\.mlp\.dense_h_to_4h",
    "ffn.out": rf"{_L}\.mlp\.dense_4h_to_h",
    "ln": r"(?:input_layernorm|post_attention_layernorm|final_layer_norm)",
    "layer": _L,
    "embeddings": r"embed_in",
    "embeddings.word": r"embed_in",
}

# Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): the experts are fused 3-D parameters in transformers 5
# (a ModuleList of linear layers in 4.57), so no one module is "the FFN's projection": the table maps
# attention, norms and layers, and `ffn.*` is refused by name (target experts by module name where they are
# modules). LoRA's default targets (attn.q, attn.v) are the usual choice for these models. Qwen2-MoE adds a
# gated `shared_expert` MLP beside the routed experts: its projections are only part of the FFN, so `ffn.*`
# stays refused there too (an adapter after `shared_expert.down_proj` would not follow the FFN).
_MOE = {alias: pattern for alias, pattern in _LLAMA.items() if not alias.startswith("ffn.")}
_T5 = {
    "attn.q": rf"{_L}\.layer\.0\.SelfAttention\.q",
    "attn.k": rf"{_L}\.layer\.0\.SelfAttention\.k",
    "attn.v": rf"{_L}\.layer\.0\.SelfAttention\.v",
    "attn.o": rf"{_L}\.layer\.0\.SelfAttention\.o",
    "attn": rf"{_L}\.layer\.0\.SelfAttention",
    "xattn.q": rf"{_L}\.layer\.1\.EncDecAttention\.q",
    "xattn.k": rf"{_L}\.layer\.1\.EncDecAttention\.k",
    "xattn.v": rf"{_L}\.layer\.1\.EncDecAttention\.v",
    "xattn.o": rf"{_L}\.layer\.1\.EncDecAttention\.o",
    "xattn": rf"{_L}\.layer\.1\.EncDecAttention",
    "ffn.in": rf"{_L}\.layer\.\d\.DenseReluDense\.(?:wi|wi_0|wi_1)",
    "ffn.out": rf"{_L}\.layer\.\d\.DenseReluDense\.wo",
    "ln": r"(?:layer_norm|final_layer_norm)",
    "layer": r"block\.\d+",
    "embeddings": r"(?:shared|embed_tokens)",
    "embeddings.word": r"(?:shared|embed_tokens)",
}

_BART = {
    "attn.q": rf"{_L}\.self_attn\.q_proj",
    "attn.k": rf"{_L}\.self_attn\.k_proj",
    "attn.v": rf"{_L}\.self_attn\.v_proj",
    "attn.o": rf"{_L}\.self_attn\.out_proj",
    "attn": rf"{_L}\.self_attn",
    "xattn.q": rf"{_L}\.encoder_attn\.q_proj",
    "xattn.k": rf"{_L}\.encoder_attn\.k_proj",
    "xattn.v": rf"{_L}\.encoder_attn\.v_proj",
    "xattn.o": rf"{_L}\.encoder_attn\.out_proj",
    "xattn": rf"{_L}\.encoder_attn",
    "ffn.in": rf"{_L}\.fc1",
    "ffn.out": rf"{_L}\.fc2",
    "ln": r"(?:self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm|layernorm_embedding|layer_norm)",
    "layer": _L,
    "embeddings": r"(?:shared|embed_tokens|embed_positions)",
    "embeddings.word": r"(?:shared|embed_tokens)",
}

# GPT-J: q/k/v/out projections, attention and MLP in parallel off `ln_1`; rotary positions, a KV cache.
_GPTJ = {
    "attn.q": rf"{_L}\.attn\.q_proj",
    "attn.k": rf"{_L}\.attn\.k_proj",
    "attn.v": rf"{_L}\.attn\.v_proj",
    "attn.o": rf"{_L}\.attn\.out_proj",
    "attn": rf"{_L}\.attn",
    "ffn.in": rf"{_L}\.mlp\.fc_in",
    "ffn.out": rf"{_L}\.mlp\.fc_out",
    "ln": r"(?:ln_1|ln_f)",
    "layer": _L,
    "embeddings": r"wte",
    "embeddings.word": r"wte",
}

# CodeGen: GPT-J's block, with q|v|k fused in `qkv_proj` in four interleaved groups (INTERLEAVED).
_CODEGEN = _GPTJ | dict.fromkeys(("attn.q", "attn.k", "attn.v"), rf"{_L}\.attn\.qkv_proj")

# GPT-Neo: the projections sit one level down, in `attn.attention`; learned positions (`wpe`).
_GPT_NEO = _GPT2 | {
    "attn.q": rf"{_L}\.attn\.attention\.q_proj",
    "attn.k": rf"{_L}\.attn\.attention\.k_proj",
    "attn.v": rf"{_L}\.attn\.attention\.v_proj",
    "attn.o": rf"{_L}\.attn\.attention\.out_proj",
    "attn": rf"{_L}\.attn\.attention",
}
_GPT_NEO = {alias: pattern for alias, pattern in _GPT_NEO.items() if not alias.startswith("xattn")}

# GPT-BigCode (SantaCoder, StarCoder 1): GPT-2's names on nn.Linear layers; `c_attn` holds q|k|v one after the
# other with one key/value head (multi-query), or head by head without it (the fused layer is the honest answer).
_GPT_BIGCODE = {alias: pattern for alias, pattern in _GPT2.items() if not alias.startswith("xattn")}

# BLOOM and Falcon: `query_key_value` interleaves the heads' q, k and v (Falcon-7B's multi-query layout does not,
# but one table serves the type: INTERLEAVED). BLOOM adds ALiBi biases, no position embeddings.
_BLOOM = {
    **dict.fromkeys(("attn.q", "attn.k", "attn.v"), rf"{_L}\.self_attention\.query_key_value"),
    "attn.o": rf"{_L}\.self_attention\.dense",
    "attn": rf"{_L}\.self_attention",
    "ffn.in": rf"{_L}\.mlp\.dense_h_to_4h",
    "ffn.out": rf"{_L}\.mlp\.dense_4h_to_h",
    "ln": r"(?:word_embeddings_layernorm|input_layernorm|post_attention_layernorm|ln_f)",
    "layer": _L,
    "embeddings": r"word_embeddings",
    "embeddings.word": r"word_embeddings",
}
# Falcon: one norm before parallel attention and MLP (`input_layernorm`), or two (`ln_attn`, `ln_mlp`: 40B/180B)
_FALCON = _BLOOM | {"ln": r"(?:input_layernorm|post_attention_layernorm|ln_attn|ln_mlp|ln_f)"}

# ALBERT shares one layer (`albert_layer_groups.0.albert_layers.0`) across every depth: a delta on it acts at
# every depth, as the weights do. Its embeddings are narrower and mapped up by `embedding_hidden_mapping_in`.
_AL = r"albert_layer_groups\.\d+\.albert_layers\.\d+"
_ALBERT = {
    "attn.q": rf"{_AL}\.attention\.query",
    "attn.k": rf"{_AL}\.attention\.key",
    "attn.v": rf"{_AL}\.attention\.value",
    "attn.o": rf"{_AL}\.attention\.dense",
    "attn": rf"{_AL}\.attention",
    "ffn.in": rf"{_AL}\.ffn",
    "ffn.out": rf"{_AL}\.ffn_output",
    "ln": rf"(?:embeddings\.LayerNorm|{_AL}\.attention\.LayerNorm|{_AL}\.full_layer_layer_norm)",
    "layer": _AL,
    "embeddings": r"embeddings",
    "embeddings.word": r"embeddings\.word_embeddings",
}

# DeBERTa (v1): `in_proj` interleaves each head's q, k and v (INTERLEAVED; it takes no cache, so prefix tuning
# is refused there); the rest is BERT's.
_DEBERTA = {alias: pattern for alias, pattern in _BERT.items() if not alias.startswith("xattn")}
_DEBERTA |= dict.fromkeys(("attn.q", "attn.k", "attn.v"), rf"{_L}\.attention\.self\.in_proj")

ALIASES: dict[str, dict[str, str]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "camembert": _BERT,
    "mpnet": _MPNET,
    # BERT's names, checked each by tests/modern.py (the alias inference would find them, but not `attn`)
    **dict.fromkeys(("ernie", "data2vec-text"), _BERT),
    "esm": _BERT | {"ln": r"(?:LayerNorm|emb_layer_norm_after)"},  # its final norm is named so
    "xlm-roberta-xl": _BERT | {"ln": r"(?:LayerNorm|self_attn_layer_norm)"},  # the norm before attention
    "megatron-bert": _BERT | {"ln": r"(?:embeddings\.LayerNorm|ln)"},  # pre-norms named `ln`
    "deberta-v2": _DEBERTA_V2,
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "smollm3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "granite": _LLAMA,
    "starcoder2": _STARCODER2,
    "phi": _PHI,
    "opt": _OPT,
    "gpt_neox": _GPT_NEOX,
    "gemma3_text": _GEMMA3,
    "olmo2": _OLMO2,
    # Llama's names, checked each by tests/modern.py (the alias inference would find most, but not `attn`)
    **dict.fromkeys(("olmo", "cohere", "cohere2", "stablelm", "helium", "ministral", "seed_oss", "arcee"), _LLAMA),
    **dict.fromkeys(("olmo3", "exaone4"), _OLMO2),
    "apertus": _APERTUS,
    "phi3": _PHI3,
    "modernbert": _MODERNBERT,
    "gptj": _GPTJ,
    "codegen": _CODEGEN,
    "gpt_neo": _GPT_NEO,
    "gpt_bigcode": _GPT_BIGCODE,
    "bloom": _BLOOM,
    "falcon": _FALCON,
    "albert": _ALBERT,
    "deberta": _DEBERTA,
    "t5": _T5,
    "mt5": _T5,
    "bart": _BART,
    "mbart": _BART,
    # BART's module names, with sinusoidal positions (Marian, Pegasus, M2M-100/NLLB) or pre-norm layers
    **dict.fromkeys(("marian", "pegasus", "m2m_100", "blenderbot", "blenderbot-small", "plbart"), _BART),
    "umt5": _T5,
    "whisper": _BART,  # BART's names; its encoder takes audio features (prompt tuning refused there)
    **VISION,
}

ALIAS_NAMES: tuple[str, ...] = tuple(sorted({k for t in ALIASES.values() for k in t} | {"head"}))

# Model types whose fused q|k|v layer (named by attn.q/attn.k/attn.v) is not laid out one after the other:
# no column slice of it is the keys (prefix tuning takes the key width from the config, on the cache route).
# GPT-BigCode interleaves head by head unless multi-query.
INTERLEAVED: frozenset[str] = frozenset({"gpt_neox", "bloom", "falcon", "codegen", "deberta", "gpt_bigcode"})

# Why a model type leaves an alias out, said where it is asked for (the generic "has no 'attn.q'" named no reason)
_MOE_FFN = "its FFN is a mixture of experts, no one module (the aliases cover attention, norms and layers)"
WHY_ABSENT: dict[str, dict[str, str]] = {
    **{t: dict.fromkeys(("ffn.in", "ffn.out"), _MOE_FFN) for t in ("mixtral", "qwen2_moe", "qwen3_moe")},
}
