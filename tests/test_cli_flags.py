"""The command line's flags: range checks, help texts and defaults, thread counts, method and model names
as users write them, and refusals in one line that names a flag or a command.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import _folder, _train, make_model_dir

from deltatune.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory)


def test_refusals_are_one_line_that_speaks_cli(tmp_path: Path, model_dir: Path, capsys) -> None:  # noqa: ANN001
    task = _folder(tmp_path / "mine")
    assert _train(model_dir, task, tmp_path / "r", "--method", "adapter", "--max-steps", "2", "--no-test") == 0
    capsys.readouterr()
    cases = [
        (["merge", str(model_dir), str(tmp_path / "r" / "delta-adapter"), str(tmp_path / "m")], "deltatune predict"),
        (["eval", "--delta", str(tmp_path / "r")], f"--delta {tmp_path / 'r' / 'delta-adapter'}"),
        (["eval", "--delta", str(task)], "pass --delta a folder `deltatune train` wrote"),
        (["eval", "--delta", str(tmp_path / "nope")], "no such folder"),
        (["train", "--task", str(task), "--dev-split", "0.1"], "drop --dev-split"),
        (["train", "--head-only", "--method", "lora"], "drop --method"),
        (["train", "--head-only", "--method-arg", "r=4"], "--head-only has none"),
    ]
    for argv, fix in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert fix in err and len(err.strip().splitlines()) == 1, err
        assert "DeltaModel" not in err and "Traceback" not in err and "save_delta" not in err


@pytest.mark.parametrize(
    "flag, value, wanted",
    [
        ("--lr", "-1", "above 0"),
        ("--max-length", "0", "at least 1"),
        ("--epochs", "nan", "above 0"),
        ("--dev-split", "1.5", "between 0 and 1"),
        ("--warmup-ratio", "1", "up to (not including) 1"),
        ("--threads", "0", "at least 1"),
        ("--batch-size", "2.5", "is not a whole number"),
    ],
)
def test_numeric_flags_are_range_checked_in_one_line(flag: str, value: str, wanted: str, capsys) -> None:  # noqa: ANN001
    assert main(["train", flag, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err and wanted in err


def test_every_flag_says_what_it_does_and_what_its_default_means() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "eval", "predict", "merge", "quickstart", "inspect"):
        for action in commands[name]._actions:
            if action.dest == "help":
                continue
            assert action.help and not action.help.startswith("("), (name, action.dest, action.help)
            if action.default is not None and not isinstance(action.default, bool) and action.default != []:
                assert "default" in action.help, (name, action.dest, action.help)
    train_help = " ".join(commands["train"].format_help().split())
    assert "each method's own rate: lora 0.00" in train_help


def test_threads_default_to_the_cores_not_already_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from deltatune.cli import args
    from deltatune.cli.args import default_threads, set_threads

    assert 0 <= args.busy_cores(2, window=0.05) <= 2
    samples = iter([(100, 1000), (150, 1100)])  # 50 of 100 jiffies busy: half of 4 cores
    monkeypatch.setattr(args, "_cpu_times", lambda: next(samples))
    assert args.busy_cores(4, window=0) == 2.0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    for busy, threads in ((0.2, 4), (1.4, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(args, "busy_cores", lambda cores, busy=busy: busy)
        assert default_threads() == threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2 and torch.get_num_threads() == 2
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_budget_flags_take_none_for_no_bound() -> None:
    from deltatune.cli.train import spec_from_args

    parser = build_parser()
    args = parser.parse_args(
        ["train", "--patience", "none", "--epochs", "none", "--max-steps", "40", "--min-steps", "0"]
    )
    train = spec_from_args(args).train
    assert (train.patience, train.epochs, train.max_steps, train.min_steps) == (None, None, 40, 0)


def test_a_hub_model_is_taken_when_the_hub_answers_and_refused_in_one_line_when_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--model bert-base-uncased` was refused unless already cached, even where the hub works (users'
    machines): now one short request decides, and only a hub that is away, offline or without the name
    gets the one-line refusal, in a second instead of transformers' minute of retries."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from deltatune.cli import check_model

    def answer(name: str, timeout: float) -> object:
        if name == "someone/missing":  # as model_info raises it (built without an HTTP response)
            missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(missing, "404")
            raise missing
        if name == "someone/away":
            raise ConnectionError("no route")
        return object()

    monkeypatch.setattr(huggingface_hub, "model_info", answer)  # read at call time by backbones.hub_refusal
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    check_model("someone/model")  # on the hub: the command goes on and transformers downloads it
    with pytest.raises(ValueError, match="hub has no model of that name"):
        check_model("someone/missing")
    with pytest.raises(ValueError, match=r"hub cannot be reached from here \(ConnectionError\)"):
        check_model("someone/away")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        check_model("someone/model")


def test_method_flags_take_names_as_users_write_them() -> None:
    from deltatune.cli.args import method_configs

    configs = method_configs(["LoRA", "BitFit"], ["LoRA.r=4"])
    assert list(configs) == ["lora", "bitfit"] and configs["lora"].r == 4
    with pytest.raises(ValueError, match="a method is named twice"):
        method_configs(["lora", "LORA"], None)


def test_a_method_arg_for_a_method_not_asked_for_names_it() -> None:
    """`--method-arg lora.r=4 --method adapter` said "AdapterConfig has no setting 'lora.r'"."""
    from deltatune.cli.args import method_configs

    with pytest.raises(ValueError, match=r"--method-arg 'lora.r=4' sets lora, which is not among --method \(adapter\)"):
        method_configs(["adapter"], ["lora.r=4"])
    assert method_configs(["lora"], ["lora.r=4"])["lora"].r == 4  # its own prefix, as with several methods
