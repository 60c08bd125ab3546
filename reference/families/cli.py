"""`reference families`: every family, and what each target can hold of it."""

from __future__ import annotations

import argparse
import re
import textwrap

WIDTH = 100  # columns the table fits in: long cells wrap


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options


def _wrap(cell: str, width: int) -> list[str]:
    """Lines of at most `width`, broken at spaces or after an underscore (feature names are
    long: sliding_window), never inside a word part."""
    marked = cell.replace("-", "\x01").replace("_", "-")  # textwrap breaks after hyphens
    lines = textwrap.wrap(marked, width, break_long_words=False, break_on_hyphens=True) or [""]
    return [line.replace("-", "_").replace("\x01", "-") for line in lines]


def table(rows: list[list[str]], width: int | None = None) -> str:
    """A markdown table, first row the header. Given a `width`, the widest columns are narrowed
    until the table fits (no narrower than their longest word), and their cells wrap onto
    continuation rows whose other cells are empty."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    floors = [max(len(piece) for r in rows for piece in re.split(r"\s+|(?<=_)", r[i]))
              for i in range(len(widths))]
    while width is not None and sum(widths) + 3 * len(widths) + 1 > width:
        narrowable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not narrowable:
            break
        widths[max(narrowable, key=lambda i: widths[i])] -= 1
    lines = []
    for r in rows:
        cells = [_wrap(c, w) for c, w in zip(r, widths, strict=True)]
        for k in range(max(map(len, cells))):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)]
            lines.append("| " + " | ".join(parts) + " |")
        if r is rows[0]:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def rows() -> list[list[str]]:
    """Header and one row per family: -> llama, llama -> family, -> megatron, -> unified."""
    from reference.converters.megatron import MegatronLayout, MegatronTarget
    from reference.families.registry import FAMILIES
    from reference.families.verdict import Unified, verdict

    llama = FAMILIES["llama"]
    out = [["family", "-> llama", "llama -> family", "-> megatron", "-> unified"]]
    for f in FAMILIES.values():
        back = "-" if f.keys is None else verdict(llama, f)
        to_mg = verdict(f, MegatronTarget(f.model_type, MegatronLayout()))
        out.append([f.model_type, verdict(f, llama), back, to_mg, verdict(f, Unified())])
    return out


def run(args: argparse.Namespace) -> int:
    print(table(rows(), width=WIDTH))
    heading = ("Folds move a scalar feature into the weights (in fp32); what each computes (its cost "
               "is measured per tensor by each conversion, in DST/conversion.json):")
    print("\n" + textwrap.fill(heading, WIDTH))
    from reference.converters.folds import FOLDS

    for fold in FOLDS.values():
        print(textwrap.fill(f"- {fold.feature}: {fold.precision}", WIDTH, subsequent_indent="  "))
    return 0
