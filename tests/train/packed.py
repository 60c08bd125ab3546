"""Random packed rows for the channel-loss tests: two samples per row, each of a channel."""

from __future__ import annotations

import torch


def packed_rows(
    g: torch.Generator, rows: int, length: int, vocab: int, pool: list[str], margin: int
) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """(input_ids, labels, a channel name per token). About a fifth of the labels are masked,
    and so is the first token of each row's second sample: no loss term crosses a packing
    boundary. The boundary lies at least `margin` tokens from either end."""
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[torch.rand(rows, length, generator=g) < 0.2] = -100
    names = []
    for r in range(rows):
        cut = int(torch.randint(margin, length - margin, (1,), generator=g))
        first, second = (pool[int(torch.randint(0, len(pool), (1,), generator=g))] for _ in "12")
        names.append([first] * cut + [second] * (length - cut))
        labels[r, cut] = -100
    return input_ids, labels, names
