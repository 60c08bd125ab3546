"""The `reference` console script: a thin argparse layer over typed functions.

The top-level parser lists the subcommands from COMMANDS without importing them; only the
chosen one's module is imported, to add its arguments and run. Those modules import torch and
transformers inside `run`, so `reference --help` and `reference COMMAND --help` stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reference.errors import ReferenceError

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "convert": ("reference.converters.cli", "convert a checkpoint between families"),
    "families": ("reference.families.cli", "list every family and what each target can hold"),
    "demo": ("reference.demo", "build tiny models, convert them, prove the logits match"),
    "train": ("reference.train.cli", "SFT with per-channel loss curves"),
}


def chosen(argv: list[str]) -> str | None:
    """The subcommand named in `argv`: its first word that is not an option (the top-level
    parser has no option that takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its one-line help; `command`'s own arguments added."""
    parser = argparse.ArgumentParser(
        prog="reference",
        description="Exact checkpoint converters and LLM fundamentals, proven against the originals.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            p.set_defaults(module=module)
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen(argv)).parse_args(argv)
    try:
        return importlib.import_module(args.module).run(args)
    except ReferenceError as e:
        print(f"reference {args.command}: error: {e}", file=sys.stderr)
        return 2
