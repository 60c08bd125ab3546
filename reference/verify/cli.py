"""`reference verify SRC DST`: prove a conversion by running both sides with their own code."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("exit status: 0 within the noise floor (10 x the fp32-vs-fp64 gap of each side, "
                "measured for this model), 1 beyond it, 2 bad input. See docs/verify.md.")
    p.add_argument("src", help="an HF model directory, a unified one, or a Megatron-LM checkpoint "
                               "(torch or torch_dist)")
    p.add_argument("dst", help="the other checkpoint, of any of those kinds")
    p.add_argument("--tokens", type=int, default=32, metavar="N",
                   help="random token ids (seeded, below the smaller vocabulary) to run (default 32)")
    p.add_argument("--layers", type=int, metavar="K",
                   help="compare the hidden states after the first K layers instead of the logits "
                        "(an HF or Megatron torch side then loads only those layers)")


def run(args: argparse.Namespace) -> int:
    """0 within the noise floor, 1 beyond it; bad input raises InputError (2)."""
    from reference.verify.compare import report, verify

    verdict = verify(args.src, args.dst, tokens=args.tokens, layers=args.layers)
    print("\n".join(report(verdict)))
    return 0 if verdict.ok else 1
