"""The model users hold, used as they use it: its train/eval switch, a merge inside a routed batch, a cast while
merged, a misspelt pattern key, train_head on tied embeddings, saving beside a merged delta. Each gave a wrong
result without an error before (tiny random BERT and Llama)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf

import deltatune as dt
from deltatune.core.targeting import TargetError


def _bert(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return tf.BertForSequenceClassification(config)


def _trained(dm: dt.DeltaModel, name: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.delta(name).parameters():
            if p.is_floating_point():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


IDS = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 1, 0])


def test_eval_on_the_users_model_reaches_the_deltas_dropout() -> None:
    """`model.eval()` on the backbone left the deltas in training mode: LoRA's dropout stayed on (two eval calls
    6e-3 apart)."""
    model = _bert()
    dm = dt.attach(model, "lora", dropout=0.5)
    _trained(dm)
    dm.train()
    model.eval()
    with torch.no_grad():
        first, second = model(input_ids=IDS).logits, model(input_ids=IDS).logits
    assert torch.equal(first, second)
    assert not any(m.training for d in dm.deltas.values() for m in d.modules())


@pytest.mark.parametrize("method,kwargs", [("adalora", {"init_r": 4}), ("lora", {"dropout": 0.5})])
def test_train_on_the_users_model_reaches_the_deltas(method: str, kwargs: dict) -> None:
    """A model from from_pretrained is in eval mode; `model.train()` after attaching left the deltas in eval
    mode: AdaLoRA's orthogonality term was left out of the loss, LoRA's dropout never applied."""
    losses = []
    for switch in ("model", "dm"):
        model = _bert().eval()
        dm = dt.attach(model, method, **kwargs)
        _trained(dm)
        (model if switch == "model" else dm).train()
        torch.manual_seed(1)
        losses.append(dm(input_ids=IDS, labels=LABELS).loss)
    assert torch.equal(losses[0], losses[1])
    assert all(m.training for d in dm.deltas.values() for m in d.modules())


def test_a_switch_inside_a_routed_batch_is_refused() -> None:
    """`dm.merge("x")` inside `with dm.route([...])` was accepted, and the merged delta then acted on every row."""
    dm = dt.attach(_bert().eval(), "lora", name="x")
    dm.add("y", "lora", enabled=False)
    _trained(dm, "x")
    _trained(dm, "y", seed=1)
    expected = dm(input_ids=IDS, delta_ids=["x", "y", None]).logits
    with dm.route(["x", "y", None]):
        for call in (lambda: dm.merge("x"), lambda: dm.add("z", "bitfit"), lambda: dm.detach("y")):
            with pytest.raises(dt.DeltaError, match=r"inside a routed batch \(`with dm.route\(...\)`\).*after the"):
                call()
        got = dm(input_ids=IDS).logits
    assert torch.equal(got, expected) and set(dm.deltas) == {"x", "y"} and not dm.delta("x").merged
    dm.merge("x")  # after the block, as before
    dm.unmerge("x")


def test_an_unmerge_after_a_cast_says_it_is_not_exact() -> None:
    """Merged in float32, cast to bfloat16, unmerged: the base came back 7e-4 off its bfloat16 cast, no word."""
    dm = dt.attach(_bert().eval(), "lora")
    _trained(dm)
    dm.merge("default")
    dm.to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"merged into float32 weights that are now bfloat16: unmerging gives the base "
                      r"back only to within that precision's rounding"):  # fmt: skip
        dm.unmerge("default")
    dm2 = dt.attach(_bert().eval().to(torch.bfloat16), "lora")  # cast first: exact, and nothing said
    _trained(dm2)
    before = {n: p.clone() for n, p in dm2.backbone.named_parameters()}
    dm2.merge("default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm2.unmerge("default")
    assert all(torch.equal(before[n], p) for n, p in dm2.backbone.named_parameters())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_pattern_key_that_matches_no_module_is_refused(method: str) -> None:
    """`rank_pattern={"quary": 2}` left every module at r=8 without a word; a misspelt target is refused."""
    model = _bert()
    with pytest.raises(TargetError, match=r"rank_pattern key 'quary' matches none of the 4 modules.*closest: query"):
        dt.attach(model, method, rank_pattern={"quary": 2})
    with pytest.raises(TargetError, match=r"alpha_pattern key 'vaule' matches none.*closest: value"):
        dt.attach(model, method, alpha_pattern={"vaule": 64.0})
    dm = dt.attach(model, method, rank_pattern={"query": 2, r"layer\.1\..*value": 4})
    assert dm.delta("default").config.rank_alpha("bert.encoder.layer.1.attention.self.value")[0] == 4


def test_train_head_on_tied_embeddings_says_no_head_trains() -> None:
    config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64)  # fmt: skip
    tied = tf.LlamaForCausalLM(tf.LlamaConfig(**config, tie_word_embeddings=True))
    with pytest.warns(UserWarning, match=r"train_head=True, but this model's head \(lm_head\) shares its weight with "
                      r"the input embeddings.*tie_word_embeddings=False"):  # fmt: skip
        dm = dt.attach(tied, "lora", train_head=True)
    assert dm.trainable_parameters() == dm.delta_parameters()
    untied = tf.LlamaForCausalLM(tf.LlamaConfig(**config, tie_word_embeddings=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = dt.attach(untied, "lora", train_head=True)
    assert dm.head_parameter_names() == ["lm_head.weight"]


def test_a_delta_saved_beside_a_merged_one_loads_onto_its_backbone(tmp_path: Path) -> None:
    """The identity was read from merged weights: the right backbone was refused as 'another checkpoint', and so
    was a model serving another delta merged."""
    dm = dt.attach(_bert().eval(), "lora", name="a")
    _trained(dm, "a")
    dm.add("b", "bitfit")
    _trained(dm, "b", seed=1)
    dm.save_delta(str(tmp_path / "a"), "a")
    dm.merge("a")
    dm.save_delta(str(tmp_path / "b"), "b")
    fresh = dt.load_delta(_bert().eval(), str(tmp_path / "b"), "b")
    saved, here = fresh.delta_state_dict("b"), dm.delta_state_dict("b")
    assert saved.keys() == here.keys() and all(torch.equal(saved[k], here[k]) for k in saved)
    serving = dt.load_delta(_bert().eval(), str(tmp_path / "a"), "a")
    serving.merge("a")
    dt.load_delta(serving, str(tmp_path / "b"), "b")  # onto a model with another delta merged
    other = _bert()
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"another checkpoint of the same architecture"):
        dt.load_delta(other.eval(), str(tmp_path / "b"), "b")


@pytest.mark.parametrize("method,kwargs", [("diff_pruning", {"mode": "magnitude"}), ("random_subset", {"count": 50})])
def test_resizing_embeddings_a_delta_acts_on_is_refused(method: str, kwargs: dict) -> None:
    """transformers writes the new table into `weight.data`, which a parametrized view throws away: the table kept
    100 rows with no error, and token 102 failed inside torch."""
    model = _bert().eval()
    dm = dt.attach(model, method, targets="embeddings.word", **kwargs)
    with pytest.raises(dt.DeltaError, match=r"resize_token_embeddings with delta\(s\) 'default' \(" + method + r"\) "
                       r"on the embeddings.*resize before attaching"):  # fmt: skip
        model.resize_token_embeddings(104)
    assert model.get_input_embeddings().weight.shape[0] == 100 and model.config.vocab_size == 100
    dm.detach()
    model.resize_token_embeddings(104)  # the guard leaves with the last delta
    assert model.get_input_embeddings().weight.shape[0] == 104


def test_resizing_embeddings_no_delta_acts_on_runs() -> None:
    model = _bert().eval()
    dm = dt.attach(model, "lora")
    _trained(dm)
    model.resize_token_embeddings(104)
    assert model.get_input_embeddings().weight.shape[0] == 104
    dm(input_ids=torch.tensor([[1, 2, 103]]))


def test_two_prompts_on_the_same_rows_are_refused_with_the_fix() -> None:
    """Both enabled: forward prepended both, generate failed on "a KV cache computed without this prompt"."""
    config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    dm = dt.attach(tf.LlamaForCausalLM(tf.LlamaConfig(**config)).eval(), "prompt", num_tokens=3)
    dm.add("b", dt.get_config("prompt", num_tokens=2))
    ids = torch.randint(0, 100, (2, 6))
    message = r"2 prompt deltas \(3, 2 tokens\) act on the same rows.*dm.set_active\(name\)"
    with pytest.raises(dt.DeltaError, match=message):
        dm(input_ids=ids)
    with pytest.raises(dt.DeltaError, match=message):
        dm.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(dt.DeltaError, match=message):
        dm(input_ids=ids, delta_ids=[["default", "b"], ["default", "b"]])
    dm.set_active("b")
    alone = dm.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    dm.enable("default")
    dm.disable("b")
    assert dm(input_ids=ids).logits.shape[1] == 6
    dm.enable("b")
    ok = dm.generate(input_ids=ids, max_new_tokens=2, do_sample=False, delta_ids=["b", "b"])
    assert torch.equal(ok, alone)


def test_a_state_of_another_rank_names_the_delta_and_the_fix() -> None:
    """torch's "size mismatch for deltas.default.layers.bert__encoder__layer__0__attention__self__query.A"."""
    dm = dt.attach(_bert(), "lora", r=4)
    with pytest.raises(dt.DeltaError, match=r"the state's deltas.default.layers.\S+ has shape \(8, 32\), but delta "
                       r"'default' here \(lora, r=4\) holds \(4, 32\).*dt.load_delta"):  # fmt: skip
        dm.load_state_dict(dt.attach(_bert(), "lora", r=8).state_dict())
    dm.load_state_dict(dt.attach(_bert(), "lora", r=4).state_dict())  # the same settings load as before


@pytest.mark.parametrize("method", ["bitfit", "layernorm", "diff_pruning", "lora"])
def test_a_plain_checkpoint_loads_into_the_users_model_under_a_delta(method: str) -> None:
    """torch's "Missing key(s) ... parametrizations.bias.original" where a delta reparametrizes a tensor."""
    model = _bert().eval()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    dm = dt.attach(model, method)
    _trained(dm)
    expected = dm(input_ids=IDS).logits
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # weights moved (the originals under a parametrization included)
    model.load_state_dict(checkpoint)  # back to the checkpoint, under the same delta
    assert torch.allclose(dm(input_ids=IDS).logits, expected, atol=1e-6)
    if dm.delta("default").config.can_merge:
        dm.merge("default")
        with pytest.raises(dt.DeltaError, match=r"load_state_dict into a model with delta\(s\) default merged"):
            model.load_state_dict(checkpoint)
        dm.unmerge("default")
    dm.detach()
    assert type(model).load_state_dict is not None and "load_state_dict" not in vars(model)


@pytest.mark.parametrize("filled_by", ["generate", "forward"])
def test_generating_on_from_a_cache_that_holds_the_prompt_is_refused(filled_by: str) -> None:
    """`generate(past_key_values=<a cache returned with the prompt in it>)`: transformers counts the virtual tokens
    as text and fed the model other tokens (GPT-2: 4 of 8 tokens other than generating at once, no error)."""
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)
    dm = dt.attach(tf.GPT2LMHeadModel(config).eval(), "prompt", num_tokens=4)
    dm.add("lora", dt.get_config("lora"))
    ids = torch.randint(3, 100, (1, 7))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    if filled_by == "generate":
        first = dm.generate(input_ids=ids, return_dict_in_generate=True, **kwargs)
        sequences, cache = first.sequences, first.past_key_values
    else:
        sequences, cache = ids, dm(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(dt.DeltaError, match="cannot continue from a KV cache that holds prompt tuning's virtual"):
        dm.generate(input_ids=sequences, past_key_values=cache, **kwargs)
    dm.disable("default")  # LoRA alone continues from its own cache as generating at once does
    first = dm.generate(input_ids=ids, return_dict_in_generate=True, **kwargs)
    on = dm.generate(input_ids=first.sequences, past_key_values=first.past_key_values, **kwargs)
    assert torch.equal(on, dm.generate(input_ids=ids, **(kwargs | {"max_new_tokens": 6})))


def test_the_backbone_mode_set_after_dm_train_reaches_the_deltas() -> None:
    """The deltas follow a change of the backbone's mode at its next forward; `dm.train()` then `model.eval()`
    with no forward between left LoRA's dropout on at inference (two eval calls 0.06 apart), and `dm.eval()`
    then `model.train()` trained with it off."""
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(
        tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).eval()
    dm = dt.attach(model, "lora", dropout=0.5)
    ids = torch.randint(0, 100, (2, 6))
    dm.train()
    model.eval()
    with torch.no_grad():
        assert torch.equal(dm(input_ids=ids).logits, dm(input_ids=ids).logits)
    assert not dm.delta().training
    dm.eval()
    model.train()
    dm(input_ids=ids)
    assert dm.delta().training
