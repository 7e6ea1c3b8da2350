"""OpenDelta's soft prompt (`SoftPromptModel`) as deltatune's prompt delta numbering positions as OpenDelta does.

OpenDelta 0.3.2 (`opendelta/delta_models/soft_prompt.py`) puts a pre-forward on the model (the encoder of an
encoder-decoder) that turns `input_ids` into `inputs_embeds`, prepends `soft_embeds` (num_tokens, hidden), puts
ones before the attention mask and zeros before `token_type_ids` and lets the model number the lengthened input:
the prompt takes the first positions, the text moves up by num_tokens. That is deltatune's `prompt` with
`positions="shift"` (the same input to the embeddings layer), except for what OpenDelta hands back and a head
that reads a position:

* its outputs keep the prompt positions (an LM's logits are num_tokens longer); deltatune's are the real
  tokens', equal to OpenDelta's there; BERT's pooler (inside the stack) reads the first prompt vector in both;
* a sequence classifier whose head reads a position of the stack's output (RoBERTa/DistilBERT the first: a
  prompt vector in OpenDelta; GPT-2/Llama the last: OpenDelta passes no input_ids, so the model cannot find the
  last real token and reads the last position, padding or not) computes other logits: refused;
* with no attention mask in the call, OpenDelta builds one from `input_ids != 0` (id 0 as padding, whatever the
  tokenizer's pad id); deltatune, as the backbone itself, attends to every token then. Calls with a mask agree.
  (OpenDelta also writes the lengthened mask into the caller's tensor in place; deltatune leaves it alone.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.delta import DeltaConfig
from ..methods.addition.prompt import PromptConfig
from .opendelta_common import OpenDeltaFormatError


def soft_prompt(model: nn.Module, config: dict, parts: dict) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    where = "encoder" if enc_dec else ""  # OpenDelta's soft_prompt_layer sits on the model, or its encoder
    if set(parts) != {where} or set(parts[where]) != {"soft_embeds"}:
        raise OpenDeltaFormatError(
            f"the soft prompt's tensors sit at {sorted(parts)}, not where OpenDelta puts them on "
            f"{type(model).__name__} ({where or 'the model itself'}): an edited file?"
        )
    embeds = parts[where]["soft_embeds"]
    n = int(config.get("soft_token_num") or 0)
    if embeds.dim() != 2 or embeds.shape[0] != n:
        raise OpenDeltaFormatError(f"soft_embeds has shape {tuple(embeds.shape)}, not ({n}, hidden) for soft_token_num={n}")  # fmt: skip
    name = type(model).__name__
    if "ForSequenceClassification" in name and getattr(getattr(model, "base_model", None), "pooler", None) is None:
        raise OpenDeltaFormatError(
            f"OpenDelta's soft prompt hands {name}'s classifier the prompt positions too: it reads the first "
            "position (a prompt vector) or the last one whatever the padding (OpenDelta passes no input_ids), "
            "while deltatune's classifier reads the real tokens, so the logits would differ; only a pooler inside "
            "the stack (BERT's, reading the first prompt vector in both) imports exactly"
        )
    return PromptConfig(num_tokens=n, positions="shift"), {"prompt": embeds}
