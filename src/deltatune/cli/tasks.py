"""List the tasks deltatune can find, with their sizes and licenses."""

from __future__ import annotations

import argparse

HELP = "list available tasks (sizes, labels, licenses)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="a tasks folder (default: $DELTATUNE_DATA or ../shared/data/tasks)")


def run(args: argparse.Namespace) -> int:
    from ..data.tasks import data_root, format_task_table, list_tasks

    print(f"tasks in {data_root(args.root)}:\n")
    print(format_task_table(list_tasks(args.root)))
    return 0
