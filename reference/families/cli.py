"""`reference families`: every family, and what each target can hold of it."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options


def table(rows: list[list[str]]) -> str:
    """A markdown table, first row the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from reference.families.registry import FAMILIES
    from reference.families.verdict import verdict

    targets = list(FAMILIES)
    rows = [["family", "architecture", *(f"-> {t}" for t in targets)]]
    for f in FAMILIES.values():
        rows.append([f.model_type, f.architecture, *(verdict(f, FAMILIES[t]) for t in targets)])
    print(table(rows))
    return 0
