"""Property tests of the pure split/merge functions: every TP layout of qkv, fc1 and the
vocabulary is lossless, and each rank's piece is exactly what Megatron-Core expects."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.converters.megatron.cut import (
    fc1_rank,
    merge_fc1,
    merge_qkv,
    merge_vocab,
    qkv_rank,
    vocab_rank,
)
from reference.converters.megatron.layout import (
    MegatronLayout,
    layout_string,
    padded_vocab,
    parse_layout_string,
    stage_layers,
)

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def attention(draw):
    """(groups, query heads per group, head_dim, tp dividing groups, trailing shape)."""
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    groups = tp * draw(st.integers(1, 3))
    per_group = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 6))
    rest = draw(st.sampled_from([(), (3,)]))  # bias, or weight with 3 input features
    return groups, per_group, head_dim, tp, rest


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _fused_by_hand(q, k, v, groups: int, per_group: int, d: int) -> torch.Tensor:
    """Megatron's linear_qkv, written out: per group, its query heads, its key, its value."""
    rows = []
    for g in range(groups):
        rows += [q[g * per_group * d:(g + 1) * per_group * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(rows)


@PROPERTY
@given(attention(), st.integers(0, 2**16))
def test_qkv_ranks_are_whole_groups_and_merge_back(shape, seed) -> None:
    groups, per_group, d, tp, rest = shape
    q = _randn(groups * per_group * d, *rest, seed=seed)
    k = _randn(groups * d, *rest, seed=seed + 1)
    v = _randn(groups * d, *rest, seed=seed + 2)
    shards = [qkv_rank(q, k, v, groups, tp, r) for r in range(tp)]
    fused = _fused_by_hand(q, k, v, groups, per_group, d)
    for r, shard in enumerate(shards):  # a rank holds a contiguous run of whole groups
        assert torch.equal(shard, fused.chunk(tp)[r])
    merged = merge_qkv(shards, groups, groups * per_group)
    for got, want in zip(merged, (q, k, v), strict=True):
        assert torch.equal(got, want)


@PROPERTY
@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 5), st.sampled_from([(), (3,)]), st.integers(0, 2**16))
def test_fc1_ranks_hold_gate_then_up_and_merge_back(tp, per_rank, rest, seed) -> None:
    ffn = tp * per_rank
    gate, up = _randn(ffn, *rest, seed=seed), _randn(ffn, *rest, seed=seed + 1)
    shards = [fc1_rank(gate, up, tp, r) for r in range(tp)]
    for r, shard in enumerate(shards):  # SwiGLU chunks each rank's output in two: gate, up
        g, u = shard.chunk(2)
        assert torch.equal(g, gate[r * per_rank:(r + 1) * per_rank])
        assert torch.equal(u, up[r * per_rank:(r + 1) * per_rank])
    merged_gate, merged_up = merge_fc1(shards)
    assert torch.equal(merged_gate, gate) and torch.equal(merged_up, up)
    if tp > 1:  # plain concatenation of the ranks is not [gate; up]
        assert not torch.equal(torch.cat(shards), torch.cat([gate, up]))


@PROPERTY
@given(st.integers(1, 700), st.sampled_from([1, 8, 128]), st.sampled_from([1, 2, 4]), st.integers(0, 2**16))
def test_vocab_is_zero_padded_to_divisor_times_tp_and_trimmed_back(vocab, divisor, tp, seed) -> None:
    padded = padded_vocab(vocab, divisor, tp)
    assert padded % (divisor * tp) == 0 and vocab <= padded < vocab + divisor * tp
    x = _randn(vocab, 3, seed=seed)
    shards = [vocab_rank(x, padded, tp, r) for r in range(tp)]
    assert all(s.shape == (padded // tp, 3) for s in shards)
    assert torch.equal(torch.cat(shards), torch.cat([x, torch.zeros(padded - vocab, 3)]))
    assert torch.equal(merge_vocab(shards, vocab), x)


@PROPERTY
@given(st.lists(st.integers(0, 6), min_size=1, max_size=8))
def test_pipeline_layout_string_roundtrips(counts) -> None:
    assert parse_layout_string(layout_string(counts)) == tuple(counts)


@PROPERTY
@given(st.integers(1, 4), st.sampled_from([None, 2, 3]), st.integers(1, 4))
def test_even_split_gives_every_virtual_stage_the_same_layers(pp, vpp, per_stage) -> None:
    stages = pp * (vpp or 1)
    counts = stage_layers(per_stage * stages, MegatronLayout(pp=pp, vpp=vpp))
    assert counts == (per_stage,) * stages
