"""`stacktrain`: one command line, one subcommand per step of raw -> stores -> pipelines -> train.

Each package registers its subcommands with `register(subparsers)`; heavy imports happen inside the
command functions so that `stacktrain --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console
from rich.markup import escape

from stores.errors import StackTrainError

# Modules that define `register(subparsers)`, in the order of the data flow.
COMMAND_MODULES = ["stores.cli", "train.split", "train.commands", "train.study", "train.report", "benchmarks.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stacktrain",
        description="Patch-wise classification of 3-D stacks: convert to Zarr, load with DALI, train.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency, not a package still to be written
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except StackTrainError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
