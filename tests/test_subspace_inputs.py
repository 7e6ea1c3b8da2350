"""A researcher's careless input to `deltatune subspace`: refused in one line naming the fix, or honored exactly.

Everything here runs `init` (no model is loaded) or the library on a tiny BERT, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main


def _init(tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str, workdir: str = "w") -> tuple[int, str]:
    code = main(["subspace", "init", "--workdir", str(tmp_path / workdir), "--tasks", "sst2,mr", *extra])
    return code, capsys.readouterr().err.strip()


def _settings(tmp_path: Path, workdir: str = "w") -> dict:
    return json.loads((tmp_path / workdir / "study.json").read_text())


def test_a_method_arg_changes_one_setting_and_keeps_the_rest_of_the_preset(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code, err = _init(
        tmp_path, capsys, "--method-arg", "selective.layers=-2", "--method-arg", "prefix.num_tokens=10",
        "--method-arg", "lora.r=4",
    )  # fmt: skip
    assert code == 0, err
    args = _settings(tmp_path)["method_args"]
    # before: the whole preset was replaced, so selective tuned every weight of its layer (targets
    # ('layer',)) and prefix trained through an MLP of width 512, without a word
    assert args["selective"] == {"targets": ["attn.o"], "layers": -2}
    assert args["prefix"] == {"num_tokens": 10, "mid_dim": 24}
    assert args["lora"] == {"r": 4, "targets": ["attn.q", "attn.v"]}
    # resuming with the same flag is the same study, not "other settings"
    assert main(["subspace", "collect", "--workdir", str(tmp_path / "w"), "--method-arg", "lora.r=4", "--tasks", "x"])
    assert "other settings" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,match",
    [
        (("--methods", "lroa,adapter"), r"unknown method 'lroa'; did you mean lora"),
        (("--methods", "lora,lora"), r"a method is listed twice in --methods lora,lora"),
        (("--lr", "lroa=1e-3"), r"--lr names 'lroa', which is not among --methods .*fix the name"),
        (("--lr", "lora=abc"), r"--lr 'lora=abc' is not method=rate, e.g. --lr lora=5e-3"),  # was float()'s line
        (("--lr", "lora=1e-3,adapter=1e-3"), r"is not method=rate, .*\(one --lr for each method\)"),
        (("--lr", "lora=-1e-3"), r"--lr lora must be a finite number > 0, got -0.001"),  # was accepted and kept
        (("--methods", "lora,adapter", "--method-arg", "prefix.num_tokens=3"), r"--method-arg names 'prefix'"),
        (("--d", "8", "--hidden", "4"), r"--hidden 4 .* must be at least --d 8"),
        (
            ("--methods", "lora,diff_pruning"),
            r"--methods diff_pruning: .*keeps a mask .*use selective or random_subset",
        ),
    ],
)
def test_careless_method_settings_are_refused_at_init(tmp_path: Path, capsys, flags: tuple, match: str) -> None:  # noqa: ANN001
    import re

    code, err = _init(tmp_path, capsys, *flags)
    assert code == 2 and len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "w").exists()


def test_a_library_method_without_a_preset_runs_with_its_defaults(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from deltatune.methods import get_config
    from deltatune.subspace.config import StudyConfig

    code, err = _init(tmp_path, capsys, "--methods", "lora,bitfit,ia3", "--lr", "bitfit=1e-3")
    assert code == 0, err  # was: "no settings for ['bitfit', 'ia3']; give them with --method-arg"
    cfg = StudyConfig.load(tmp_path / "w")
    assert cfg.method_config("ia3") == get_config("ia3") and cfg.lrs["bitfit"] == 1e-3


@pytest.mark.parametrize("method", ["bitfit", "layernorm"])
def test_methods_that_claim_the_same_weights_share_a_bank_exactly(method: str) -> None:
    """BitFit and LayerNorm tuning both reparametrize the LayerNorm biases: each was collected alone, and the
    bank holding both ran `find` into 'already claimed by another delta', after the whole collect."""
    import torch
    from test_subspace import WORDS, tiny_bert
    from tiny import make_tokenizer

    import deltatune as dt
    from deltatune.methods import get_config
    from deltatune.subspace.flatten import flatten
    from deltatune.subspace.functional import Bank

    tokenizer = make_tokenizer(WORDS)
    configs = {m: get_config(m) for m in ("bitfit", "layernorm")}
    bank = Bank(tiny_bert(tokenizer), tokenizer, configs, max_length=16)
    reference = dt.attach(tiny_bert(tokenizer), configs[method], name=method)
    with torch.no_grad():
        for p in reference.delta(method).parameters():
            p.add_(0.1 * torch.randn_like(p))
    head = {n: p.detach() for n, p in reference.backbone.named_parameters() if n.startswith("classifier")}
    batch = dict(tokenizer(["the movie was good", "the plot was sad sad"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = reference(**batch).logits
        got = bank.logits(method, flatten(reference.delta_state_dict(method), bank.layouts[method]), head, batch)
    assert torch.allclose(got, expected, atol=1e-5)


def test_landscape_names_the_study_s_methods_for_one_it_does_not_run(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code, err = _init(tmp_path, capsys, "--methods", "adapter,prefix")
    assert code == 0, err
    code = main(["subspace", "landscape", "--workdir", str(tmp_path / "w"), "--method", "lora"])
    err = capsys.readouterr().err  # was: "spaces/unified-sst2.safetensors is missing", or "run `optimize` first"
    assert code == 2 and "--method lora: not a method of this study (adapter, prefix)" in err


def test_a_d_above_a_method_s_size_is_refused_before_its_solutions_train(tmp_path: Path) -> None:
    """Before: collected and found; the prefix basis came out 256 columns wide and optimize failed midway with
    torch's 'size mismatch, got input (256), ...', rows of the other methods already written."""
    import torch
    from test_subspace import toy_study

    from deltatune.subspace.space import orthonormal_completion

    mp = pytest.MonkeyPatch()
    try:
        study = toy_study(tmp_path, mp, d=300, hidden=300)
        with pytest.raises(ValueError, match=r"--d 300 is larger than the prefix delta's 256 numbers: .*use --d 256"):
            study.collect(["toya"])
    finally:
        mp.undo()
    assert [r["method"] for r in study.store.rows("subspace_solutions")] == ["head"]
    with pytest.raises(ValueError, match=r"cannot complete 5 orthonormal directions in 4 dimensions"):
        orthonormal_completion(torch.zeros(4, 0), 5, seed=0)


def test_stages_run_out_of_order_say_which_stage_comes_first(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from test_subspace import toy_study

    mp = pytest.MonkeyPatch()
    try:
        study = toy_study(tmp_path, mp)
        with pytest.raises(ValueError, match=r"pca, random, unified-multi, unified-toya ... not found "
                                             r"yet: run `deltatune subspace find` first$"):  # fmt: skip
            study.optimize()  # was: 'spaces/unified-toya.safetensors is missing; run the stage that writes it first'
        with pytest.raises(ValueError, match=r"no vector to transfer: none was optimized yet; run `deltatune "
                                             r"subspace optimize` first"):  # fmt: skip
            study.transfer()  # was: a progress bar over nothing, exit 0
        with pytest.raises(FileNotFoundError, match=r"subspace unified-toya was not found yet .*run `deltatune "
                                                     r"subspace find` first"):  # fmt: skip
            study.space("unified-toya")
    finally:
        mp.undo()
    assert main(["subspace", "optimize", "--workdir", str(study.workdir), "--spaces", "singel"]) == 2
    assert "--spaces singel: not a kind of subspace; choose from single,multi," in capsys.readouterr().err


def test_a_classifier_checkpoint_of_another_class_count_gets_a_new_head(tmp_path: Path) -> None:
    """Before: transformers' 'You set `ignore_mismatched_sizes` to `False`' at collect (3-class task) and in
    the evaluation bank (built with 2 labels) for every task."""
    from test_subspace import WORDS, tiny_bert
    from tiny import make_tokenizer

    from deltatune.subspace.collect import backbone_for
    from deltatune.subspace.config import StudyConfig

    tokenizer = make_tokenizer(WORDS)
    tiny_bert(tokenizer, num_labels=3).save_pretrained(tmp_path / "nli")
    tokenizer.save_pretrained(tmp_path / "nli")
    cfg = StudyConfig(model=str(tmp_path / "nli"))
    assert backbone_for(cfg, 2).classifier.out_features == 2
    assert backbone_for(cfg, 1).classifier.out_features == 1
    assert backbone_for(cfg, 3).classifier.out_features == 3
