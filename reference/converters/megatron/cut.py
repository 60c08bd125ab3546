"""One TP rank's piece of a full tensor, and the full tensor from every rank's piece: the pure
tensor functions behind Megatron-Core's layout (`layout.py`). Slicing and concatenation only,
so every split/merge pair is lossless."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reference.families.keymap import Fused
from reference.families.spec import ModelSpec


def cat_rows(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows; of data-free stand-ins (shapes planned, checked) only the shape:
    torch.cat's meta kernel imports torch._dynamo, 0.6 s of every conversion. One piece is
    itself, not a copy (a `torch_dist` tensor is read as one piece, TP 1)."""
    if len(pieces) == 1:
        return pieces[0]
    if pieces[0].is_meta:
        return pieces[0].new_empty((sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]))
    return torch.cat(list(pieces))


def cols_rank(x: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Input columns of a row-parallel linear's weight held by `rank`."""
    return x.chunk(tp, dim=1)[rank]


def vocab_blocks(x: torch.Tensor, padded: int, tp: int, rank: int) -> list[torch.Tensor]:
    """Rank's rows of the embedding zero-padded to `padded` rows: its rows of `x` (a view), and
    the zeros below them if it has any padding."""
    per = padded // tp
    lo, hi = rank * per, (rank + 1) * per
    real = x[lo:min(hi, x.shape[0])]
    if real.shape[0] == hi - lo:
        return [real]
    return [real, x.new_zeros((hi - lo - real.shape[0], *x.shape[1:]))]


def vocab_rank(x: torch.Tensor, padded: int, tp: int, rank: int) -> torch.Tensor:
    """Rank's rows of the embedding zero-padded to `padded` rows, without padding all of it
    (unpadded: a view of `x`, which a writer copies if it must)."""
    return cat_rows(vocab_blocks(x, padded, tp, rank))


def vocab_rows(shards: Sequence[torch.Tensor], vocab_size: int) -> list[torch.Tensor]:
    """`merge_vocab` as row blocks: every rank's rows up to the true vocabulary."""
    blocks, left = [], vocab_size
    for s in shards:
        blocks.append(s[:left])
        left -= blocks[-1].shape[0]
    return [b for b in blocks if b.shape[0]] or blocks[:1]


def merge_vocab(shards: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """The embedding from every rank's rows, trimmed to the true vocabulary."""
    return cat_rows(vocab_rows(shards, vocab_size))


def tp_share(spec: ModelSpec, tp: int) -> ModelSpec:
    """What one TP rank computes of a model: 1/tp of its heads, query groups and MLP width."""
    return spec.replace(num_heads=spec.num_heads // tp, num_kv_heads=spec.num_kv_heads // tp,
                        intermediate_size=spec.intermediate_size // tp)


def fused_blocks(fused: Fused, parts: Sequence[torch.Tensor], spec: ModelSpec, tp: int,
                 rank: int) -> list[torch.Tensor]:
    """The row blocks (views of the parts) whose concatenation is `fused_rank`."""
    chunks = [p.chunk(tp)[rank] for p in parts]
    taken = [0] * len(chunks)
    blocks = []
    for part, rows in fused.blocks(tp_share(spec, tp)):
        blocks.append(chunks[part][taken[part]:taken[part] + rows])
        taken[part] += rows
    return blocks


def fused_rank(fused: Fused, parts: Sequence[torch.Tensor], spec: ModelSpec, tp: int,
               rank: int) -> torch.Tensor:
    """Rank's rows of a column-parallel fused tensor: its row chunk of every part, laid out as
    the fused tensor of the rank's share of the model (`tp_share`). Megatron's `linear_qkv`
    thus holds whole query groups, and `linear_fc1` cat(gate_r, up_r), which SwiGLU chunks in two."""
    return cat_rows(fused_blocks(fused, parts, spec, tp, rank))


def fused_rows(fused: Fused, shards: Sequence[torch.Tensor], spec: ModelSpec) -> list[list[torch.Tensor]]:
    """`merge_fused` as row blocks: each part's blocks (views of the shards), rank after rank."""
    share = tp_share(spec, len(shards))
    blocks: list[list[torch.Tensor]] = [[] for _ in fused.parts]
    for shard in shards:
        for mine, theirs in zip(blocks, fused.row_blocks(shard, share), strict=True):
            mine.extend(theirs)
    return blocks


def merge_fused(fused: Fused, shards: Sequence[torch.Tensor], spec: ModelSpec) -> list[torch.Tensor]:
    """The parts of a column-parallel fused tensor from every rank's rows; plain concatenation
    of the ranks would interleave them. Each part is one concatenation of its row blocks, rank
    after rank (splitting each rank first and then joining the ranks copied every byte twice)."""
    return [cat_rows(b) for b in fused_rows(fused, shards, spec)]
