"""The `reference` console script: a thin argparse layer over typed functions.

Subcommand modules are imported only when chosen, so `reference --help` stays instant.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reference",
        description="Exact checkpoint converters and LLM fundamentals, proven against the originals.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args.module).run(args)
    except ReferenceError as e:
        print(f"reference {args.command}: error: {e}", file=sys.stderr)
        return 2
