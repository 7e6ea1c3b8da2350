"""Prompt tuning (Lester et al. 2021): `num_tokens` trainable vectors prepended to the input embeddings.

The prompt is prepended inside the stack that embeds the input (the base model; the encoder of an
encoder-decoder) by a pre-hook that turns `input_ids` into `inputs_embeds` and gives the attention
mask `num_tokens` ones. The task head stays outside: for encoder-only and decoder-only models an
output hook drops the prompt positions from the stack's output, so the head sees one position per
input token. Token-level labels then need no padding, and GPT-2/Llama classification, which pools
the last non-pad token found in `input_ids`, still pools each row's own last token (BERT's pooler,
which reads the first position, reads the first prompt vector's output, as in PEFT). An
encoder-decoder keeps the prompt positions (the decoder cross-attends to them, as in the paper)
and a pre-hook on the decoder extends the encoder mask it receives.

Positions (`positions`): with "keep" (the default) the prompt vectors all take the first position
and the real tokens keep the positions they have without a prompt. A constant position embedding
added to a free vector is absorbed by training, and the text stays where the backbone was
pretrained to see it, so a 100-token prompt does not eat into (or overflow) the position table.
"shift" numbers as PEFT does, prompt first: the prompt takes the first `num_tokens` positions and
every real token moves up by `num_tokens` (models that number by length get no hook: the
lengthened input numbers itself). A prompt trained one way computes another function under the
other on models with absolute or rotary positions, so the setting is saved with the delta and PEFT
prompts import as "shift". T5's relative positions need nothing either way.

Generation: the prompt is prepended at the prefill step and so enters the KV cache; later steps
(a non-empty cache this delta filled) only get the mask extended and positions kept. Not
mergeable: the prompt lengthens the sequence, which no weight change can express.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ...core import compat, compat_prompt
from ...core.compat import CallArgs
from ...core.delta import Delta, DeltaConfig, DeltaError, Hooks, setting
from ...core.routing import Route, RoutingError

INITS = ("random", "uniform", "vocab", "text")
POSITIONS = ("keep", "shift")  # real tokens keep their positions, or move up by num_tokens (PEFT's numbering)
_TAG = "_deltatune_prompt"  # set on KV caches that hold a prompt, so later steps do not prepend it again


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


@dataclasses.dataclass
class PromptConfig(DeltaConfig):
    method: ClassVar[str] = "prompt"
    family: ClassVar[str] = "addition"
    trains: ClassVar[str] = "num_tokens soft token embeddings prepended to the (encoder's) input"
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    static_cache: ClassVar[bool] = (
        False  # generate refuses a fixed-size KV cache: its virtual tokens lengthen the sequence the cache holds (core.conventions)
    )
    peft_names: ClassVar[dict[str, str]] = {"num_virtual_tokens": "num_tokens", "prompt_tuning_init_text": "init_text"}
    default_lr: ClassVar[float] = 3e-2  # prompts need large steps (the paper: 0.3 with Adafactor)

    num_tokens: int = setting(100, size=True)
    # "random": normal with the embedding matrix's std; "uniform": U(-0.5, 0.5) as in the paper;
    # "vocab": embeddings of randomly drawn vocabulary tokens; "text": embeddings of `init_text` tokens.
    init: str = "random"
    seed: int = setting(0, ge=0)
    init_text: str | None = None
    tokenizer_path: str | None = None
    init_token_ids: list[int] | None = None
    positions: str = "keep"  # see the module docstring: "shift" reproduces PEFT's numbering

    def build(self) -> Prompt:
        return Prompt(self)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int):
            raise ValueError(f"{name}.num_tokens must be a positive integer, got {self.num_tokens!r}")
        if self.init not in INITS:
            raise ValueError(f"{name}.init must be one of {', '.join(INITS)}, got {self.init!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{name}.seed must be an integer (it seeds the prompt's init), got {self.seed!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"{name}.positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.init != "text":
            if self.init_text is not None or self.init_token_ids is not None:
                raise ValueError(f"{name}.init_text / init_token_ids are only read with init='text'; set init='text'")
            return
        if self.init_token_ids is None and self.init_text is None:
            raise ValueError(f"{name}.init='text' needs init_text (with tokenizer_path) or init_token_ids")
        if self.init_token_ids is None and self.tokenizer_path is None:
            raise ValueError(
                f"{name}.init_text cannot be tokenized without a tokenizer: set tokenizer_path "
                "(a name or folder for AutoTokenizer) or pass the token ids as init_token_ids"
            )
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if (
                not isinstance(ids, list | tuple)
                or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            ):
                raise ValueError(
                    f"{name}.init_token_ids must be a non-empty list of token ids (ints >= 0), got {ids!r}"
                )


class Prompt(Delta):
    config: PromptConfig

    def __init__(self, config: PromptConfig) -> None:
        super().__init__(config)
        self._calls: list[bool] = []  # per stack call in flight: whether the prompt was prepended

    def attach(self, model: nn.Module, hooks: Hooks) -> None:
        cfg = self.config
        self.enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        stack = compat.encoder(model) if self.enc_dec else compat.base_model(model)
        embed, params = compat.token_embeddings(stack), compat.signature(stack).parameters
        if embed is None or "inputs_embeds" not in params:  # SigLIP's two towers take input_ids, no inputs_embeds
            lacks = "no token embedding table" if embed is None else "no inputs_embeds"
            raise ValueError(
                f"prompt tuning prepends vectors to a stack's token embeddings and passes them as inputs_embeds; "
                f"{type(stack).__name__} takes {next(iter(params), '?')!r} first and has {lacks}: use prefix tuning, "
                "LoRA or adapters on this model"
            )
        object.__setattr__(self, "embed", embed)  # the backbone's: not a submodule of ours
        self._limit, self._limit_of = compat_prompt.rows_limit(stack, model)  # GPT-Neo's mask, RoFormer's table
        if self._limit is not None and cfg.num_tokens >= self._limit:
            raise ValueError(
                f"PromptConfig.num_tokens is {cfg.num_tokens}, but {type(stack).__name__}'s {self._limit_of} "
                f"{self._limit} positions, input tokens included; use fewer prompt tokens (e.g. "
                f"num_tokens={max(1, min(20, self._limit // 4))})"
            )
        weight = self.embed.weight
        self.prompt = nn.Parameter(_initial_prompt(cfg, self.embed).to(weight.dtype))
        self.sites[module_name(model, stack)] = self.prompt.numel()
        self._stack_sig = compat.signature(stack)
        self._cache_arg = compat.cache_keyword(stack)  # where decoding steps hand the stack its KV cache
        # prompts on one stack, in attach order: in a mixed batch the first one with rows prepends every
        # row's own prompt (sequences must stay one length), the others stand by
        self._peers: list[Prompt] = hooks.shared(stack, "prompts")
        hooks.on_input(stack, self._prepend, route_aware=True)
        hooks.on_output(stack, self._strip, route_aware=True)
        # BART (and DistilBERT 4.x) number positions by length: the real tokens keep theirs (with
        # "shift", the lengthened input numbering itself is PEFT's numbering)
        for module, hook in (
            compat_prompt.shape_numbered_positions(stack, cfg.num_tokens) if cfg.positions == "keep" else ()
        ):
            hooks.on_input(module, hook, route_aware=True)
        if self.enc_dec:
            decoder = compat.decoder(model)
            self._decoder_sig = compat.signature(decoder)
            hooks.on_input(decoder, self._extend_encoder_mask, route_aware=True)

    def check_generation(self, kwargs: dict[str, Any]) -> None:
        """A KV cache given to generate that already holds the prompt (from an earlier generate, or a forward):
        transformers counts the virtual tokens as tokens of the text, so it fed the model the wrong ones (GPT-2:
        4 of 8 tokens other than generating at once, logits 0.68 off, no error)."""
        cache = kwargs.get("past_key_values")
        if cache is not None and getattr(cache, _TAG, None) and compat.seq_length(cache) > 0:
            raise DeltaError(
                "generate cannot continue from a KV cache that holds prompt tuning's virtual tokens (past_key_values "
                "returned by an earlier generate or forward): transformers counts them as tokens of the text and "
                "would feed the model other tokens; generate from the whole sequence without past_key_values"
            )

    @classmethod
    def check_rows(cls, routed: list[tuple[Delta, Route]]) -> None:
        """Once some prompt serves only some rows, every row needs exactly one prompt (rows stay one length).
        Checked when the rows are given as well as in the forward: `dm.encode(..., delta_ids=...)` batches rows by
        length, and its refusals named rows of its own batches, or none when the lengths happened to group well."""
        peers = [route for _, route in routed if not route.empty]  # a disabled delta serves the rows it is named for
        if not peers or all(route.full for route in peers):
            return
        counts = torch.zeros(peers[0].batch, dtype=torch.long)
        for route in peers:
            counts[route.rows.cpu()] += 1
        bad = (counts != 1).nonzero().flatten().tolist()
        if bad:
            raise RoutingError(
                f"rows {bad[:8]} of this mixed batch have {'no' if counts[bad[0]] == 0 else 'several'} prompt "
                "deltas; with prompt tuning every row needs exactly one prompt, so that rows stay one length"
            )

    def _mixed_peers(self) -> list[Prompt] | None:
        """In a mixed batch, the prompts serving its rows (exactly one per row, all one length); else None."""
        route = self.route
        if route is None or route.full:
            return None
        peers = [p for p in self._peers if p.route is not None and not p.route.empty]
        type(self).check_rows([(p, p.route) for p in peers])
        lengths = {p.config.num_tokens for p in peers}
        if len({p.config.positions for p in peers}) > 1 and not self._stack_sig.parameters.get("position_ids"):
            raise RoutingError(
                "prompts with positions 'keep' and 'shift' cannot share a batch on a model that numbers positions "
                "by length (it takes no position_ids); serve each setting apart"
            )
        if len(lengths) > 1:
            raise RoutingError(f"prompts of lengths {sorted(lengths)} cannot share a batch; serve each length apart")
        return peers

    def _refuse_stacked(self) -> None:
        """Two prompts on the same rows (both enabled, or rows routed to both): forward prepended both, but
        generation then failed on "a KV cache computed without this prompt", and a cached step drifted (1e-3).
        Every row takes one prompt, as in a mixed batch."""
        full = self.route is not None
        others = [
            p for p in self._peers
            if p is not self and ((p.route is not None and p.route.full) if full else (p.route is None and p.active))
        ]  # fmt: skip
        if others:
            lengths = ", ".join(str(p.config.num_tokens) for p in [self, *others])
            raise DeltaError(
                f"{len(others) + 1} prompt deltas ({lengths} tokens) act on the same rows: with prompt tuning every row "
                "takes one prompt; enable one at a time (dm.set_active(name)), or give rows different prompts "
                "(delta_ids)"
            )

    def _batch_prompt(self, peers: list[Prompt] | None, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, num_tokens, dim): this prompt on every row, or each row's own in a mixed batch."""
        if peers is None:
            return self.prompt.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        which = torch.empty(self.route.batch, dtype=torch.long, device=self.prompt.device)
        for j, p in enumerate(peers):
            which[p.route.rows] = j
        which = which.repeat_interleave(batch // self.route.batch)  # generation may widen rows (beams)
        return torch.stack([p.prompt.to(dtype) for p in peers])[which]

    # -- hooks ------------------------------------------------------------------------------------
    def _prepend(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        peers = self._mixed_peers()
        if peers is not None and peers[0] is not self:  # another prompt prepends for every row
            self._calls.append(False)
            return None
        if peers is None:
            self._refuse_stacked()
        call = CallArgs(self._stack_sig, args, kwargs)
        n = self.config.num_tokens
        ids, embeds, mask = call.get("input_ids"), call.get("inputs_embeds"), call.get("attention_mask")
        cache = compat.call_cache(call, self._cache_arg)
        past = compat.seq_length(cache)
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"prompt tuning extends a 2-D (batch, seq) attention mask; got a {mask.dim()}-D mask")
        if past > 0:  # a decoding step: the prompt is already in the cache
            if getattr(cache, _TAG, None) != n:
                raise ValueError(
                    "the KV cache holds tokens computed without this prompt; "
                    "start from an empty cache so the prompt is prepended at the first step"
                )
            new = (ids if ids is not None else embeds).shape[1]
            device = (ids if ids is not None else embeds).device
            self._check_limit(module, past - n + new)
            if mask is not None and mask.shape[1] == past - n + new:
                call.set("attention_mask", _ones_before(mask, n))
            if call.accepts("position_ids"):
                given = call.get("position_ids")
                if given is None:  # the cache's length counts the prompt: "keep" numbers without it
                    given = torch.arange(past - n, past - n + new, device=device).unsqueeze(0)
                batch = (ids if ids is not None else embeds).shape[0]
                call.set("position_ids", given + self._shifts(peers, batch, device))
            compat.renumber_cache_position(call, past, new, device)
            self._calls.append(False)
            return call.result()
        compat_prompt.refuse_packed(call, kwargs, mask)
        if embeds is None:
            embeds = self.embed(ids)
        batch = embeds.shape[0]
        self._check_limit(module, embeds.shape[1])
        prompt = self._batch_prompt(peers, batch, embeds.dtype)
        call.set("input_ids", None)
        call.set("inputs_embeds", torch.cat([prompt, embeds], dim=1))
        if mask is not None:
            call.set("attention_mask", _ones_before(mask, n))
        elif call.accepts("attention_mask") and not bool(self._shifts(peers, batch, embeds.device).all()):
            # "keep" restarts the positions after the prompt; with no mask and no cache (use_cache=False,
            # gradient checkpointing) transformers reads restarting positions as packed sequences and
            # hides the prompt from the text: outputs of the bare model and a zero gradient for the prompt
            call.set("attention_mask", torch.ones(batch, n + embeds.shape[1], dtype=torch.long, device=embeds.device))
        compat_prompt.token_types_with_prefix(module, call, n, batch, embeds.shape[1], embeds.device)
        compat_prompt.row_flags_with_prefix(call, n, batch)
        compat.renumber_cache_position(call, past, n + embeds.shape[1], embeds.device)
        if call.accepts("position_ids"):
            real, first = compat_prompt.real_positions(module, ids, embeds, call.get("position_ids"))
            shifts = self._shifts(peers, batch, embeds.device)  # (batch, 1): 0 ("keep") or n ("shift")
            # "keep": every prompt vector at the first position; "shift": the prompt counts from it
            ahead = first + torch.arange(n, device=embeds.device).expand(batch, -1) * shifts.clamp(max=1)
            call.set("position_ids", torch.cat([ahead, real.expand(batch, -1) + shifts], dim=1))
        if cache is not None:
            setattr(cache, _TAG, n)
        self._calls.append(not self.enc_dec)
        return call.result()

    def _check_limit(self, stack: nn.Module, tokens: int) -> None:
        """The prompt and `tokens` real tokens (generated ones included) must fit the stack's causal buffer, or the
        position table it numbers the whole sequence by."""
        n = self.config.num_tokens
        if self._limit is not None and n + tokens > self._limit:
            raise ValueError(
                f"prompt tuning: {n} prompt tokens + {tokens} input tokens are more than the {self._limit} positions "
                f"{type(stack).__name__}'s {self._limit_of}; give at most {self._limit - n} input tokens"
            )

    def _shifts(self, peers: list[Prompt] | None, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, 1): how far each row's real tokens move, num_tokens where its prompt says "shift"."""

        def shift(p: Prompt) -> int:
            return p.config.num_tokens if p.config.positions == "shift" else 0

        if peers is None:
            return torch.full((batch, 1), shift(self), dtype=torch.long, device=device)
        rows = torch.empty(self.route.batch, 1, dtype=torch.long, device=device)
        for p in peers:
            rows[p.route.rows] = shift(p)
        return rows.repeat_interleave(batch // self.route.batch, dim=0)  # generation may widen rows (beams)

    def _strip(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        prepended = self._calls.pop() if self._calls else False
        cache = compat.output_cache(output)
        if cache is not None and prepended:
            setattr(cache, _TAG, self.config.num_tokens)
        if not prepended:
            return output
        n = self.config.num_tokens
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output["last_hidden_state"] = output["last_hidden_state"][:, n:]
        if getattr(output, "hidden_states", None) is not None:
            output["hidden_states"] = tuple(h[:, n:] for h in output["hidden_states"])
        return output

    def _extend_encoder_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = CallArgs(self._decoder_sig, args, kwargs)
        mask, states = call.get("encoder_attention_mask"), call.get("encoder_hidden_states")
        n = self.config.num_tokens
        if mask is not None and states is not None and mask.dim() == 2 and mask.shape[1] == states.shape[1] - n:
            call.set("encoder_attention_mask", _ones_before(mask, n))
        return call.result()


def _ones_before(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


@torch.no_grad()
def _initial_prompt(cfg: PromptConfig, embed: nn.Module) -> torch.Tensor:
    weight = embed.weight
    vocab, dim = weight.shape
    n = cfg.num_tokens
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "uniform":
        return (torch.rand(n, dim, generator=g) - 0.5).to(weight.device)
    if cfg.init == "random":
        rows = torch.randperm(vocab, generator=g)[:4096].to(weight.device)  # a sample: tables can be huge
        std = weight[rows].float().std().item() * float(getattr(embed, "embed_scale", 1.0) or 1.0)
        return (torch.randn(n, dim, generator=g) * std).to(weight.device)
    if cfg.init == "vocab":
        candidates = torch.arange(vocab)
        special = getattr(embed, "padding_idx", None)
        if special is not None and vocab > 1:
            candidates = candidates[candidates != special]
        if len(candidates) >= n:
            chosen = candidates[torch.randperm(len(candidates), generator=g)[:n]]
        else:
            chosen = candidates[torch.randint(len(candidates), (n,), generator=g)]
        return embed(chosen.to(weight.device)).float()
    ids = list(cfg.init_token_ids) if cfg.init_token_ids is not None else _tokenize(cfg)
    if not ids:
        raise ValueError(f"PromptConfig.init_text {cfg.init_text!r} tokenizes to no tokens; give a longer text")
    bad = [i for i in ids if i >= vocab]
    if bad:
        raise ValueError(f"PromptConfig.init_token_ids {bad} are outside the vocabulary (size {vocab})")
    repeated = (ids * (n // len(ids) + 1))[:n]
    return embed(torch.tensor(repeated, device=weight.device)).float()


def _tokenize(cfg: PromptConfig) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    ids = list(tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"])
    if ids and tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in ids):
        raise ValueError(
            f"PromptConfig.init_text {cfg.init_text!r} is all unknown tokens under the tokenizer at "
            f"{cfg.tokenizer_path!r}: is it the model's tokenizer (a folder without tokenizer files gives one "
            "that knows no words)?"
        )
    return ids
