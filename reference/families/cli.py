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


def rows() -> list[list[str]]:
    """Header and one row per family: -> llama, llama -> family, -> megatron, -> unified."""
    from reference.converters import megatron
    from reference.families.registry import FAMILIES
    from reference.families.verdict import Unified, verdict

    llama = FAMILIES["llama"]
    mg = getattr(megatron, "MegatronTarget", None)
    out = [["family", "-> llama", "llama -> family", "-> megatron", "-> unified"]]
    for f in FAMILIES.values():
        if f.keys is None:
            back = "-"
        else:
            back = verdict(llama, f)
        to_mg = verdict(f, mg(f.model_type, megatron.MegatronLayout())) if mg else "not built yet"
        out.append([f.model_type, verdict(f, llama), back, to_mg, verdict(f, Unified())])
    return out


def run(args: argparse.Namespace) -> int:
    print(table(rows()))
    print("\nFolds move a scalar feature into the weights (in fp32); what each costs:")
    from reference.converters.folds import FOLDS

    for fold in FOLDS.values():
        print(f"- {fold.feature}: {fold.precision}")
    return 0
