"""The subspace study on a tiny BERT and toy tasks: flat vectors, the functional model, finding, baselines, d90."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from tiny import BAD, GOOD, make_tokenizer
from tiny import tiny_bert as shared_tiny_bert

import deltatune as dt
from deltatune.core.fastfood import Fastfood
from deltatune.subspace.baselines import fastfood_basis, random_space
from deltatune.subspace.collect import Solution
from deltatune.subspace.config import StudyConfig
from deltatune.subspace.find import find_unified
from deltatune.subspace.flatten import Layout, flatten, unflatten
from deltatune.subspace.functional import Bank
from deltatune.subspace.intrinsic import search_d90
from deltatune.subspace.pipeline import Study
from deltatune.subspace.store import Store

NOUNS = ["movie", "film", "plot", "cast"]
WORDS = GOOD + BAD + NOUNS + ["the", "was"]
CONFIGS = {
    "adapter": dt.AdapterConfig(placement="pfeiffer", bottleneck=4),
    "lora": dt.LoRAConfig(r=2),
    "prefix": dt.PrefixConfig(num_tokens=2, mid_dim=8),
    "selective": dt.SelectiveConfig(targets=("attn.o",), layers=-1),
}


def write_task(root: Path, name: str, seed: int, flip: bool = False) -> None:
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True)
    for split, n in (("train", 64), ("dev", 24)):
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            word = rng.choice(GOOD if label != flip else BAD)
            rows.append({"text": f"the {rng.choice(NOUNS)} was {word}", "label": label})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = {"name": name, "type": "classification", "labels": ["negative", "positive"], "license": "test"}
    (folder / "meta.json").write_text(json.dumps(meta))


def toy_study(root: Path, mp: pytest.MonkeyPatch, **overrides: object) -> Study:
    """Three toy tasks (toyc unseen) and a study over them with CONFIGS' tiny methods, ready to collect."""
    for i, name in enumerate(("toya", "toyb", "toyc")):
        write_task(root / "tasks", name, seed=i, flip=name == "toyb")
    mp.setenv("DELTATUNE_DATA", str(root / "tasks"))
    settings = dict(
        tasks=["toya", "toyb", "toyc"], unseen=["toyc"], methods=list(CONFIGS),
        method_args={m: dataclasses.asdict(c) for m, c in CONFIGS.items()},
        k_shot=8, dev_k=4, n_eval=16, max_length=16, batch_size=8, steps=4, eval_every=2, d=2, hidden=4,
        find_steps=2, scratch_find_steps=3, optimize_steps=3, said_steps=2, d_max=8,
    )  # fmt: skip
    cfg = StudyConfig(**{**settings, **overrides})
    cfg.validate()
    cfg.save(root / "work")
    tokenizer = make_tokenizer(WORDS)
    return Study(root / "work", tokenizer=tokenizer, make_backbone=lambda n: tiny_bert(tokenizer, n))


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return make_tokenizer(WORDS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """Tiny models are dominated by thread synchronization: on busy shared cores one thread is ~10x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(tokenizer, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:  # noqa: ANN001
    return shared_tiny_bert(tokenizer, num_labels, seed).eval()


def test_flatten_round_trips_in_sorted_name_order_and_refuses_other_layouts() -> None:
    state = {"b.w": torch.randn(2, 3), "a.w": torch.randn(4), "idx": torch.arange(3)}
    layout = Layout.of(state)
    assert layout.names == ("a.w", "b.w") and layout.size == 10  # integer buffers are not part of a solution
    vector = flatten(state)
    assert torch.equal(vector[:4], state["a.w"])
    back = unflatten(vector, layout)
    assert all(torch.equal(back[k], state[k]) for k in layout.names)
    assert Layout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    with pytest.raises(ValueError, match="layouts differ"):
        flatten({"a.w": torch.randn(5), "b.w": torch.randn(2, 3)}, layout)
    with pytest.raises(ValueError, match="does not fit"):
        unflatten(torch.zeros(11), layout)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_bank_runs_a_flat_vector_exactly_as_the_attached_delta(tokenizer, method: str) -> None:  # noqa: ANN001
    bank = Bank(tiny_bert(tokenizer), tokenizer, CONFIGS, max_length=16)
    reference = dt.attach(tiny_bert(tokenizer), CONFIGS[method], name=method)
    reference.delta(method).finalize()
    with torch.no_grad():  # a non-trivial delta, so that a vector ignored by the bank would show
        for p in reference.delta(method).parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = reference.delta_state_dict(method)
    layout = Layout.of(state)
    assert layout == bank.layouts[method]
    head = {n: p.detach() for n, p in reference.backbone.named_parameters() if n.startswith("classifier")}
    batch = tokenizer(["the movie was good", "the plot was sad sad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits
    vector = flatten(state, layout).requires_grad_(True)
    got = bank.logits(method, vector, head, dict(batch))
    assert torch.allclose(got, expected, atol=1e-5)
    got.sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0  # the loss is a function of the vector


def _planted(tokenizer, d: int, n_tasks: int, seed: int = 0):  # noqa: ANN001, ANN202
    """Solutions x_tm = x0_m + B_m z_t: every method's solutions lie in a known d-dim space, with shared z_t."""
    bank = Bank(tiny_bert(tokenizer), tokenizer, CONFIGS, max_length=16)
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randn(d, generator=g) for _ in range(n_tasks)]
    solutions, planted = {}, {}
    for m, layout in bank.layouts.items():
        init = 0.01 * torch.randn(layout.size, generator=g)
        q, _ = torch.linalg.qr(torch.randn(layout.size, d, generator=g))
        planted[m] = q
        for t, z in enumerate(codes):
            solutions[(f"t{t}", m)] = Solution(f"t{t}", m, init + 0.5 * q @ z, init, layout, 1.0)
    return bank, solutions, planted


@pytest.fixture
def planted_study(tokenizer, tmp_path: Path, monkeypatch):  # noqa: ANN001, ANN201
    """Five toy tasks whose solutions of every method lie in one planted 3-dim space, with their data and heads."""
    from deltatune.subspace.config import StudyConfig, task_data

    monkeypatch.setenv("DELTATUNE_DATA", str(tmp_path))
    bank, solutions, planted = _planted(tokenizer, 3, 5)
    for t in range(5):
        write_task(tmp_path, f"t{t}", seed=t)
    cfg = StudyConfig(k_shot=8, n_eval=8, max_length=16)
    data = {f"t{t}": task_data(f"t{t}", cfg) for t in range(5)}
    heads = {t: {n: p.detach() for n, p in tiny_bert(tokenizer).named_parameters() if "classifier" in n} for t in data}
    return bank, solutions, planted, data, heads


def test_finding_recovers_a_planted_subspace(planted_study) -> None:  # noqa: ANN001
    bank, solutions, planted, data, heads = planted_study
    d, n_tasks = 3, 5
    log: list = []
    space = find_unified(bank, solutions, data, heads, name="planted", d=d, hidden=8, steps=8, batch_size=8, log=log)
    assert len(log) == 8 and all(r["task_loss"] > 0 for r in log)
    errors = space.meta["relative_error"]
    assert len(errors) == n_tasks * len(CONFIGS) and max(errors.values()) < 0.05
    for m, q in planted.items():  # the found basis spans the planted one: projecting onto it loses nothing
        basis, _ = torch.linalg.qr(space.bases[m])
        assert torch.linalg.norm(q - basis @ (basis.T @ q)) / torch.linalg.norm(q) < 0.05
    # one coordinate system: the vector found for a task through one method is that task's point for every method
    for (t, _source), z in space.vectors.items():
        for b in CONFIGS:
            target = solutions[(t, b)].displacement
            assert torch.linalg.norm(space.bases[b] @ z - target) / torch.linalg.norm(target) < 0.1
    # a random subspace of the same dimension does not contain the solutions
    rand = random_space(solutions, list(data), list(CONFIGS), d)
    for m, q in planted.items():
        basis, _ = torch.linalg.qr(rand.bases[m])
        assert torch.linalg.norm(q - basis @ (basis.T @ q)) / torch.linalg.norm(q) > 0.9


def test_projections_trained_from_scratch_find_a_planted_subspace(planted_study) -> None:  # noqa: ANN001
    """No warm start: random orthonormal up-projections and default down-projections, trained by the loss alone."""
    bank, solutions, planted, data, heads = planted_study
    d = 3
    with pytest.raises(ValueError, match="unknown init 'pca'; choose from joint, random"):
        find_unified(bank, solutions, data, heads, name="x", d=d, hidden=8, steps=1, init="pca")
    log: list = []
    space = find_unified(
        bank, solutions, data, heads, name="scratch", d=d, hidden=8, steps=300, batch_size=8, init="random",
        log=log,
    )  # fmt: skip
    assert log[0]["distance"] > 0.9  # it did not start at the answer
    assert max(space.meta["relative_error"].values()) < 0.1
    for m, q in planted.items():
        basis, _ = torch.linalg.qr(space.bases[m])
        assert torch.linalg.norm(q - basis @ (basis.T @ q)) / torch.linalg.norm(q) < 0.1


def test_fastfood_basis_is_the_projection_materialized() -> None:
    basis = fastfood_basis(300, 4, seed=3)
    z = torch.randn(4)
    assert basis.shape == (300, 4)
    assert torch.allclose(basis @ z, Fastfood(4, 300, seed=3)(z), atol=1e-5)


def test_d90_search_doubles_then_bisects_and_reuses_known_points() -> None:
    calls: list[int] = []

    def measure(d: int) -> float:  # gain saturates around d = 100
        calls.append(d)
        return 0.5 + 0.4 * min(d, 100) / 100

    d90, scores = search_d90(measure, reference=0.9, baseline=0.5, d_min=4, d_max=1024, bisect_steps=6)
    assert 90 <= d90 <= 100 and all(s == measure.__call__(d) or True for d, s in scores.items())
    assert calls[:4] == [4, 16, 64, 256]  # x4 until the target (0.86) is reached at 256, then bisection
    calls.clear()
    again, _ = search_d90(measure, 0.9, 0.5, d_min=4, d_max=1024, bisect_steps=6, known=scores)
    assert again == d90 and calls == []
    never, _ = search_d90(lambda d: 0.5, 0.9, 0.5, d_min=4, d_max=64)
    assert never is None
    with pytest.raises(ValueError, match="no gain"):
        search_d90(measure, reference=0.5, baseline=0.6)


def test_store_replaces_rows_by_key_and_round_trips_json(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.put("subspace_spaces", name="a", kind="pca", d=4, tasks=["x"], methods=["lora"], path="p", meta={"k": 1})
    store.put("subspace_spaces", name="a", kind="pca", d=8, tasks=["x", "y"], methods=["lora"], path="p", meta={})
    rows = Store(tmp_path / "s.db").rows("subspace_spaces")
    assert len(rows) == 1 and rows[0]["d"] == 8 and rows[0]["tasks"] == ["x", "y"]
    assert store.has("subspace_spaces", name="a") and not store.has("subspace_spaces", name="b")
    with pytest.raises(ValueError, match="unknown table"):
        store.rows("study_runs")


def test_d90_search_never_measures_above_its_cap() -> None:
    """`intrinsic-dim --d-max 8` trained SAID at d=16, the first size of the search, above the cap."""
    asked: list[int] = []

    def measure(d: int) -> float:
        asked.append(d)
        return 0.5

    d90, _ = search_d90(measure, reference=0.9, baseline=0.5, d_min=16, d_max=8)
    assert d90 is None and asked == [8]
