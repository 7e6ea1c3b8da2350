"""The `deltatune` command: one module per subcommand, registered in COMMANDS."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

from ..core.targeting import TargetError
from ..train.upstream import quiet_upstream
from . import evaluate, quickstart, tasks, train
from . import inspect as inspect_cmd
from . import study as study_cmd
from . import subspace as subspace_cmd
from .args import check_model  # noqa: F401 - deltatune.cli.check_model, as before

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "quickstart": (quickstart.HELP, quickstart.add_arguments, quickstart.run),
    "train": (train.HELP, train.add_arguments, train.run),
    "eval": (evaluate.HELP_EVAL, evaluate.add_eval_arguments, evaluate.run_eval),
    "predict": (evaluate.HELP_PREDICT, evaluate.add_predict_arguments, evaluate.run_predict),
    "merge": (evaluate.HELP_MERGE, evaluate.add_merge_arguments, evaluate.run_merge),
    "tasks": (tasks.HELP, tasks.add_arguments, tasks.run),
    "inspect": (inspect_cmd.HELP, inspect_cmd.add_arguments, inspect_cmd.run),
    "reseal": (inspect_cmd.HELP_RESEAL, inspect_cmd.add_reseal_arguments, inspect_cmd.run_reseal),
    "study": (study_cmd.HELP, study_cmd.add_arguments, study_cmd.run),
    "subspace": (subspace_cmd.HELP, subspace_cmd.add_arguments, subspace_cmd.run),
}


# what a user can cause (a wrong path, value, file or state); anything else is a bug and says so
USER_ERRORS = (ValueError, KeyError, OSError, ImportError, RuntimeError, sqlite3.DatabaseError, json.JSONDecodeError)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that says where the help is (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deltatune",
        description="Delta tuning of pretrained transformers. Add --debug anywhere to see a failure's traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(message).split())
    if isinstance(err, OSError) and getattr(err, "filename", None) and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    if isinstance(err, TargetError):  # the library's advice is in Python ("target modules by name"): the flag
        text = f"{text} (on the command line: --method-arg targets=<name>,<name>)"
    return text or type(err).__name__


def _warning_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    return f"warning: {message}\n" if category is UserWarning else f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. User errors print one line naming the fix (exit 2), never a traceback;
    `--debug` (anywhere on the line) lets the exception through with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error, already printed as one line (2)
        return done.code if isinstance(done.code, int) else 2
    formatter = warnings.formatwarning
    if not debug:  # deltatune's own warnings as a line each, like its errors (not file:line + source)
        warnings.formatwarning = _warning_line
        quiet_upstream()
    try:
        return _run(args, debug)
    finally:
        warnings.formatwarning = formatter  # main() also runs inside other programs (tests, notebooks)


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        model = getattr(args, "model", None)
        if isinstance(model, str):
            check_model(model)
        return COMMANDS[args.command][2](args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        text = _one_line(err)
        if isinstance(err, sqlite3.DatabaseError) and getattr(args, "db", None):  # "database disk image is malformed"
            text += f" ({args.db}: a damaged or truncated store; restore it from git or a backup)"
        print(f"deltatune {args.command}: error: {text}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: still one line, with how to see the traceback
        if debug:
            raise
        print(
            f"deltatune {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
            "(rerun with --debug for the traceback, and report it)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
