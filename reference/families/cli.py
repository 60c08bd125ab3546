"""`reference families`: every family, and what each target can hold of it."""

from __future__ import annotations

import argparse
import textwrap

WIDTH = 100  # columns the table fits in: long cells wrap


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options


def table(rows: list[list[str]], width: int | None = None) -> str:
    """A markdown table, first row the header. Given a `width`, the widest columns are narrowed
    until the table fits (no narrower than their longest word), and their cells wrap onto
    continuation rows whose other cells are empty."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    floors = [max(len(word) for r in rows for word in r[i].split() or [""]) for i in range(len(widths))]
    while width is not None and sum(widths) + 3 * len(widths) + 1 > width:
        narrowable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not narrowable:
            break
        widths[max(narrowable, key=lambda i: widths[i])] -= 1
    lines = []
    for r in rows:
        cells = [textwrap.wrap(c, w, break_long_words=False) or [""] for c, w in zip(r, widths, strict=True)]
        for k in range(max(map(len, cells))):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)]
            lines.append("| " + " | ".join(parts) + " |")
        if r is rows[0]:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
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
    out = rows()
    # A column that reads the same for every family (-> unified, until it is built) is one
    # line under the table rather than a column the others must share the width with.
    same = [i for i in range(1, len(out[0])) if len({r[i] for r in out[1:]}) == 1]
    print(table([[c for i, c in enumerate(r) if i not in same] for r in out], width=WIDTH))
    for i in same:
        print(f"{out[0][i]}: {out[1][i]}, for every family")
    print("\nFolds move a scalar feature into the weights (in fp32); what each costs:")
    from reference.converters.folds import FOLDS

    for fold in FOLDS.values():
        print(textwrap.fill(f"- {fold.feature}: {fold.precision}", WIDTH, subsequent_indent="  "))
    return 0
