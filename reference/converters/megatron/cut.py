"""One TP rank's piece of a full tensor, and the full tensor from every rank's piece: the pure
tensor functions behind Megatron-Core's layout (`layout.py`). Slicing and concatenation only,
so every split/merge pair is lossless."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rows_rank(x: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rows of a column-parallel linear's weight (or bias) held by `rank`."""
    return x.chunk(tp, dim=0)[rank]


def cols_rank(x: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Input columns of a row-parallel linear's weight held by `rank`."""
    return x.chunk(tp, dim=1)[rank]


def vocab_rank(x: torch.Tensor, padded: int, tp: int, rank: int) -> torch.Tensor:
    """Rank's rows of the embedding zero-padded to `padded` rows, without padding all of it."""
    per = padded // tp
    lo, hi = rank * per, (rank + 1) * per
    real = x[lo:min(hi, x.shape[0])]
    pad = x.new_zeros((hi - lo - real.shape[0], *x.shape[1:]))
    return torch.cat([real, pad])


def merge_vocab(shards: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """The embedding from every rank's rows, trimmed to the true vocabulary."""
    return torch.cat(list(shards))[:vocab_size]


def qkv_rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, tp: int,
             rank: int) -> torch.Tensor:
    """Rank's rows of Megatron's fused `linear_qkv`: for each of its query groups, the group's
    query heads, then its key head, then its value head. TP takes whole groups."""
    mine = slice(rank * groups // tp, (rank + 1) * groups // tp)
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest)[mine] for t in (q, k, v)]  # (G/tp, rows per group, ...)
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def merge_qkv(shards: Sequence[torch.Tensor], groups: int, heads: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from every rank's rows of `linear_qkv`."""
    fused = torch.cat(list(shards))
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, -1, *rest)  # (G, (q_per_group + 2) * d, ...)
    d = per_group.shape[1] // (heads // groups + 2)
    q, k, v = per_group.split([per_group.shape[1] - 2 * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fc1_rank(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank's rows of Megatron's `linear_fc1`: cat(gate_r, up_r), which SwiGLU chunks in two."""
    return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])


def merge_fc1(shards: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up from every rank's `linear_fc1`; plain concatenation would interleave them."""
    halves = [s.chunk(2) for s in shards]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
