"""Generation and mixed-batch serving on the 2026 architectures (tests/modern.py).

generate() with a KV cache must give what greedy decoding by full forward passes gives: a prefix that
the cache dropped or stored twice, or a prompt counted wrong in a sliding window, would still decode,
only to other tokens. Mixed batches (`delta_ids`) must give each row what its delta gives alone.
"""

from __future__ import annotations

import pytest
import torch
from modern import CAUSAL, MAIN, assert_rows_alone, greedy, logits, make_inputs, make_model
from tiny import perturbed

import deltatune as dt
from deltatune.core.routing import RoutingError

SMALL = {"prefix": {"num_tokens": 3}, "prompt": {"num_tokens": 4}}
ROUTABLE = (
    "lora", "adapter", "parallel_adapter", "prompt", "bitfit", "ia3",
    "dora", "layernorm", "compacter", "vera", "loha", "lokr", "oft",
)  # fmt: skip  # the main methods but prefix, whose keys live in the attention cache shared by the batch
STEPS = 8  # 6 input tokens + 8 generated: every 4-token window slides


def _ids(case: tuple) -> str:
    return "-".join(case)


def _no_eos(dm: dt.DeltaModel) -> dt.DeltaModel:
    """Decode all STEPS tokens: a row that stops at eos is padded, the greedy loop runs on."""
    dm.backbone.generation_config.eos_token_id = None
    return dm


def _prompt(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_generate_equals_greedy_decoding_without_a_cache(arch: str, method: str) -> None:
    dm = _no_eos(perturbed(dt.attach(make_model(arch, "lm"), method, **SMALL[method]), scale=0.5))
    ids = _prompt()
    with torch.no_grad():
        out = dm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
    assert torch.equal(out.sequences, greedy(dm, ids, STEPS))
    cache = out.past_key_values
    held = max(cache.get_seq_length(i) for i in range(dm.config.num_hidden_layers))
    # the prefix is attended at every step, never cached; a prompt enters the cache once, at the first step
    real = ids.shape[1] + STEPS - 1
    assert held == real + (SMALL[method]["num_tokens"] if method == "prompt" else 0)
    seq = {"input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences)}
    prompted = logits(dm, seq)
    dm.disable("default")
    assert (logits(dm, seq) - prompted).abs().max() > 1e-2, "the delta changes nothing: the comparison proves nothing"


def _served(arch: str, head: str, method: str) -> dt.DeltaModel:
    dm = dt.DeltaModel(make_model(arch, head))
    for i, name in enumerate(("a", "b")):
        dm.add(name, dt.get_config(method, **SMALL.get(method, {})), enabled=False)
        perturbed(dm, scale=0.3, seed=i)  # b's turn moves a again: the two differ either way
    return dm


@pytest.mark.parametrize("method", ROUTABLE)
@pytest.mark.parametrize("arch,head", MAIN, ids=map(_ids, MAIN))
def test_each_row_of_a_mixed_batch_equals_its_delta_alone(arch: str, head: str, method: str) -> None:
    if (arch, method) == ("olmo", "layernorm"):
        pytest.skip("OLMo's norms have no weight or bias: layernorm tuning is refused (test_arch_modern)")
    dm = _served(arch, head, method)
    inputs = {k: v for k, v in make_inputs(dm.backbone, batch=4).items() if k != "labels"}
    if arch == "deberta-v2" and any(n.endswith(("query_proj", "key_proj")) for n in dm.delta("a").sites):
        # v3 shares its query and key projections with its relative position embeddings, one tensor for the
        # batch: no row can have its own delta there, so a mixed batch is refused, not averaged or mixed up
        with pytest.raises(RoutingError, match="is computed once for every row of the batch"):
            dm(**inputs, delta_ids=["a", None, "b", "a"])
        return
    rows = ["a", "b", "b", "a"] if method == "prompt" else ["a", None, "b", "a"]  # a prompt row needs a prompt
    assert_rows_alone(dm, inputs, rows)


@pytest.mark.parametrize("method", ["lora", "prompt"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_mixed_generate_matches_each_row_generated_alone(arch: str, method: str) -> None:
    dm = _no_eos(_served(arch, "lm", method))
    ids = _prompt(batch=3)
    rows = ["a", "b", "a"]
    kwargs = {"max_new_tokens": STEPS, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = dm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), delta_ids=rows, **kwargs)
        for i, name in enumerate(rows):
            dm.set_active(name)
            alone = dm.generate(input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kwargs)
            assert torch.equal(mixed[i : i + 1], alone), (i, name)
