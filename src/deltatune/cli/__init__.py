"""The `deltatune` command: one module per subcommand, registered in COMMANDS."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from . import evaluate, quickstart, tasks, train
from . import inspect as inspect_cmd
from . import study as study_cmd
from . import subspace as subspace_cmd

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "quickstart": (quickstart.HELP, quickstart.add_arguments, quickstart.run),
    "train": (train.HELP, train.add_arguments, train.run),
    "eval": (evaluate.HELP_EVAL, evaluate.add_eval_arguments, evaluate.run_eval),
    "predict": (evaluate.HELP_PREDICT, evaluate.add_predict_arguments, evaluate.run_predict),
    "merge": (evaluate.HELP_MERGE, evaluate.add_merge_arguments, evaluate.run_merge),
    "tasks": (tasks.HELP, tasks.add_arguments, tasks.run),
    "inspect": (inspect_cmd.HELP, inspect_cmd.add_arguments, inspect_cmd.run),
    "study": (study_cmd.HELP, study_cmd.add_arguments, study_cmd.run),
    "subspace": (subspace_cmd.HELP, subspace_cmd.add_arguments, subspace_cmd.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Delta tuning of pretrained transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args) or 0
    except (ValueError, KeyError, FileNotFoundError, ImportError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"deltatune {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
