"""`reference demo`: tiny random models of every family, converted to every family that can
hold them, and the logits compared with the original transformers model. No network."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="keep the models here (default: a temporary directory)")


def demo(workdir: Path) -> list[list[str]]:
    """Rows of (source, target, tied, max |logit difference|, roundtrip, verdict)."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    from reference.converters import convert
    from reference.errors import ReferenceError
    from reference.families.registry import FAMILIES
    from reference.tiny import logits, tiny_model

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(safetensors.torch.load_file(f))
        return out

    rows = []
    for source in FAMILIES:
        for tie in (False, True):
            model = tiny_model(source, tie=tie)
            want = logits(model)
            src = workdir / f"{source}-tie{int(tie)}"
            model.save_pretrained(src)
            for target in FAMILIES:
                if target == source:
                    continue
                dst, back = workdir / f"{src.name}-to-{target}", workdir / f"{src.name}-to-{target}-back"
                try:
                    convert(src, dst, to=target, force=True)
                except ReferenceError as e:
                    rows.append([source, target, str(tie), "-", "-", f"refused: {e}"])
                    continue
                got = logits(AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager"))
                diff = (got - want).abs().max().item()
                close = torch.allclose(got, want, rtol=1.3e-6, atol=1e-5)  # assert_close's fp32 defaults
                convert(dst, back, to=source, force=True)
                a, b = tensors(src), tensors(back)
                bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                rows.append([source, target, str(tie), f"{diff:.1e}", "bitwise" if bitwise else "DIFFERS",
                             "exact" if close and bitwise else "MISMATCH"])
    return rows


def run(args: argparse.Namespace) -> int:
    from reference.families.cli import table

    header = ["source", "target", "tied", "max |dlogits|", "roundtrip", "verdict"]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        rows = demo(Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = demo(Path(tmp))
    print(table([header, *rows]))
    return 0 if all(r[-1] in ("exact",) or r[-1].startswith("refused") for r in rows) else 1
