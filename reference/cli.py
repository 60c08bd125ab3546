"""The `reference` console script: a thin argparse layer over typed functions.

The top-level parser lists the subcommands from COMMANDS without importing them; only the
chosen one's module is imported, to add its arguments and run. Those modules import neither
torch nor transformers at import time or in `add_arguments`: they are imported inside `run`,
and only by the commands that need them (`reference families` needs neither). So
`reference --help` and `reference COMMAND --help` import neither (tests/test_cli.py checks).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from reference.errors import InputError

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "convert": ("reference.converters.cli", "convert a checkpoint between families"),
    "families": ("reference.families.cli", "list every family and what each target can hold"),
    "demo": ("reference.demo", "build tiny models, convert them, prove the logits match"),
    "train": ("reference.train.cli", "SFT with per-channel loss curves"),
    "inspect": ("reference.inspect_cli", "probe one forward: layer change, logit lens, attention"),
    "generate": ("reference.generate", "stream a continuation of a prompt from a model directory"),
    "infer": ("reference.infer.cli", "batch inference over many model replicas, each row exactly once"),
    "verify": ("reference.verify.cli", "compare two checkpoints, each run by its own implementation"),
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
    try:
        try:
            return dispatch(sys.argv[1:] if argv is None else argv)
        finally:
            sys.stdout.flush()  # a reader that has gone surfaces here, not at exit as a traceback
    except BrokenPipeError:
        # `reference families | head -1`. As the Python docs advise, stdout goes to devnull so
        # that the interpreter's own flush at exit does not fail again; 141 is what a shell
        # reports for a command that SIGPIPE ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def dispatch(argv: list[str]) -> int:
    """Parse `argv` and run the chosen subcommand; bad input is one line on stderr, exit 2."""
    args = build_parser(chosen(argv)).parse_args(argv)
    try:
        return importlib.import_module(args.module).run(args)
    except InputError as e:
        print(f"reference {args.command}: error: {e}", file=sys.stderr)
        return 2
