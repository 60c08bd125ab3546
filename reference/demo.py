"""`reference demo`: tiny random models of every family, converted into Llama's layout and back
(and Llama into each family), the logits compared with the original transformers model. Families
Llama cannot express are shown refused, naming the feature, and then converted to the unified
model's format, which holds them, and back. No network, no hub."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the demo runs: `reference --help` stays fast
    import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="keep the models here (default: a temporary directory)")


def _tensors(path: Path) -> dict:
    import safetensors.torch

    out: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether torch.testing.assert_close, at its defaults for the dtype, accepts `got`."""
    import torch

    try:
        torch.testing.assert_close(got, want)
    except AssertionError:
        return False
    return True


def _pair(source: str, target: str, tie: bool, workdir: Path) -> list[str]:
    """One row: convert a tiny `source` model to `target` and back, and compare."""
    import torch
    from transformers import AutoModelForCausalLM

    import reference.modeling  # noqa: F401  (AutoModelForCausalLM then loads unified directories)
    from reference.converters import convert
    from reference.errors import Inexpressible, InputError
    from reference.tiny import logits, tiny_model

    model = tiny_model(source, tie=tie)
    src = workdir / f"{source}-tie{int(tie)}"
    model.save_pretrained(src)
    dst, back = workdir / f"{src.name}-to-{target}", workdir / f"{src.name}-to-{target}-back"
    try:
        there = convert(src, dst, to=target, force=True)
    except InputError as e:  # the feature names it; `reference convert` says the rest
        why = e.feature if isinstance(e, Inexpressible) else str(e)
        return [source, target, str(tie), "-", "-", f"refused: {why}"]
    got = logits(AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager"))
    want = logits(model)
    diff = (got - want).abs().max().item()
    close = _close(got, want)
    again = convert(dst, back, to=source, force=True)
    if there.folds or again.folds:  # values moved into weights: compare what they compute
        back_logits = logits(AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager"))
        ok = _close(back_logits, want)
        roundtrip = "logits equal (folded)" if ok else "DIFFERS"
    else:
        a, b = _tensors(src), _tensors(back)
        ok = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        roundtrip = "bitwise" if ok else "DIFFERS"
    return [source, target, str(tie), f"{diff:.1e}", roundtrip, "exact" if close and ok else "MISMATCH"]


def demo(workdir: Path) -> list[list[str]]:
    """Rows of (source, target, tied, max |logit difference|, roundtrip, verdict)."""
    from reference.families.registry import FAMILIES
    from reference.tiny import TINY

    built = [f for f in FAMILIES if f in TINY and FAMILIES[f].keys is not None and f != "llama"]
    rows = [_pair(f, "llama", tie, workdir) for f in built for tie in (False, True)]
    rows += [_pair("llama", f, False, workdir) for f in built]
    refused = [r[0] for r in rows if r[1] == "llama" and r[2] == "False" and r[-1].startswith("refused")]
    rows += [_pair(f, "unified", False, workdir) for f in refused]  # what Llama cannot hold
    rows += [_pair(f, "llama", False, workdir) for f in FAMILIES if f in TINY and FAMILIES[f].keys is None]
    return rows


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from reference.families.cli import WIDTH, table

    header = ["source", "target", "tied", "max |dlogits|", "roundtrip", "verdict"]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for every tiny model saved and loaded is noise here
    try:
        if args.workdir:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            rows = demo(Path(args.workdir))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows = demo(Path(tmp))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(table([header, *rows], width=WIDTH))
    return 0 if all(r[-1] == "exact" or r[-1].startswith("refused") for r in rows) else 1
