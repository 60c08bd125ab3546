"""`verify(src, dst)`: run two checkpoints with their own implementations on the same token
ids and judge the largest difference against a noise floor measured for this model.

The noise floor. Two correct implementations of one model differ only by how they round:
fused or split GEMMs, another summation order, rope tables computed another way. Each side is
therefore run twice, in fp32 (the comparison) and in fp64 (near exact): |fp32 - fp64| is how
far fp32 rounding moves *this* model's outputs on *these* ids in that implementation. If both
sides compute the same function, |a32 - b32| <= |a32 - a64| + |a64 - b64| + |b64 - b32|, where
|a64 - b64| is rounding of the same kind and size (both libraries build rope tables in fp32
even in fp64); so the limit is MARGIN x (floor_a + floor_b). A wrong tensor, a dropped bias or
a mis-split head moves the outputs by orders of magnitude more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reference.errors import InputError
from reference.verify.sides import Side, open_side

MARGIN = 10.0  # measured: correct conversions sit at 0 to 0.6 x the floor sum (docs/verify.md)
SEED = 0


@dataclass(frozen=True)
class Verdict:
    src: Side
    dst: Side
    what: str  # "logits" or "hidden states after layer K"
    tokens: int
    max_diff: float
    floors: tuple[float, float]
    top1: int | None  # positions whose argmax agrees (logits only)
    note: str = ""  # why the outputs could not be compared at all

    @property
    def limit(self) -> float:
        return MARGIN * sum(self.floors)

    @property
    def ok(self) -> bool:
        return not self.note and self.max_diff <= self.limit


def token_ids(vocab: int, tokens: int, seed: int = SEED) -> torch.Tensor:
    """`(1, tokens)` ids drawn uniformly below `vocab`, the same for every run with this seed."""
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))


def _floor(out: dict[str, torch.Tensor]) -> float:
    return (out["float32"].double() - out["float64"].double()).abs().max().item()


def verify(src: Path, dst: Path, tokens: int = 32, layers: int | None = None,
           start_method: str = "spawn") -> Verdict:
    """Both checkpoints run on the same ids; logits compared over the smaller vocabulary (or, with
    `layers`, the hidden states after the first `layers` layers). `start_method`: of the
    Megatron ranks (see `mcore_ranks.run_megatron`)."""
    if tokens < 1:
        raise InputError(f"--tokens {tokens}: must be at least 1")
    a, b = open_side(Path(src)), open_side(Path(dst))
    depth = min(a.spec.num_layers, b.spec.num_layers)
    if layers is not None and not 1 <= layers <= depth:
        raise InputError(f"--layers {layers}: must be between 1 and {depth} (the layers of both)")
    vocab = min(a.spec.vocab_size, b.spec.vocab_size)
    ids = token_ids(vocab, tokens)
    out_a, out_b = a.run(ids, layers, start_method), b.run(ids, layers, start_method)
    what = "logits" if layers is None else f"hidden states after layer {layers}"
    floors = (_floor(out_a), _floor(out_b))
    x, y = out_a["float32"].double(), out_b["float32"].double()
    if layers is None:
        x, y = x[..., :vocab], y[..., :vocab]
    if x.shape != y.shape:
        return Verdict(a, b, what, tokens, float("inf"), floors, None,
                       f"{what} have shapes {list(x.shape)} and {list(y.shape)}")
    top1 = int((x.argmax(-1) == y.argmax(-1)).sum()) if layers is None else None
    return Verdict(a, b, what, tokens, (x - y).abs().max().item(), floors, top1)


def report(v: Verdict) -> list[str]:
    """The lines `reference verify` prints."""
    lines = [f"src: {v.src.path} ({v.src.label})", f"dst: {v.dst.path} ({v.dst.label})"]
    if v.note:
        return [*lines, f"DIFFERENT: {v.note}"]
    lines.append(f"{v.what}, {v.tokens} tokens: max |src - dst| = {v.max_diff:.3g}"
                 + (f", top-1 agreement {v.top1}/{v.tokens}" if v.top1 is not None else ""))
    lines.append(f"noise floor (|fp32 - fp64| of each side): {v.floors[0]:.3g} + {v.floors[1]:.3g}; "
                 f"limit {MARGIN:g} x floor = {v.limit:.3g}")
    lines.append("OK: within the noise floor" if v.ok
                 else f"DIFFERENT: {v.max_diff / max(v.limit, 1e-300):.3g} x beyond the noise floor")
    return lines
