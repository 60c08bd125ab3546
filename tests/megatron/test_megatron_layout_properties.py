"""Property tests of the pure split/merge functions: every TP layout of qkv, fc1 and the
vocabulary is lossless, and each rank's piece is exactly what Megatron-Core expects."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.converters.megatron.cut import fused_rank, merge_fused, merge_vocab, vocab_rank
from reference.converters.megatron.keys import LOCAL_RULES
from reference.converters.megatron.layout import (
    MegatronLayout,
    layout_string,
    padded_vocab,
    parse_layout_string,
    stage_layers,
)
from reference.converters.megatron.stage import shard, unshard
from reference.errors import InputError
from reference.families.keymap import Fused
from reference.families.spec import ModelSpec

PROPERTY = settings(max_examples=60, deadline=None)


def _fused(key: str) -> Fused:
    """The block layout of a fused tensor of Megatron's local layer spec."""
    (split,) = [r.split for r in LOCAL_RULES if r.key.endswith(key) and r.width == "dense"]
    assert isinstance(split, Fused)
    return split


def _spec(heads: int, groups: int, head_dim: int, ffn: int) -> ModelSpec:
    return ModelSpec(vocab_size=8, hidden_size=8, intermediate_size=ffn, num_layers=1, num_heads=heads,
                     num_kv_heads=groups, head_dim=head_dim, max_position_embeddings=8, norm_eps=1e-5,
                     hidden_act="silu")


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
    spec, qkv = _spec(groups * per_group, groups, d, 1), _fused("linear_qkv.weight")
    shards = [fused_rank(qkv, (q, k, v), spec, tp, r) for r in range(tp)]
    fused = _fused_by_hand(q, k, v, groups, per_group, d)
    for r, piece in enumerate(shards):  # a rank holds a contiguous run of whole groups
        assert torch.equal(piece, fused.chunk(tp)[r])
    merged = merge_fused(qkv, shards, spec)
    for got, want in zip(merged, (q, k, v), strict=True):
        assert torch.equal(got, want)


@PROPERTY
@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 5), st.sampled_from([(), (3,)]), st.integers(0, 2**16))
def test_fc1_ranks_hold_gate_then_up_and_merge_back(tp, per_rank, rest, seed) -> None:
    ffn = tp * per_rank
    gate, up = _randn(ffn, *rest, seed=seed), _randn(ffn, *rest, seed=seed + 1)
    spec, fc1 = _spec(tp, tp, 1, ffn), _fused("linear_fc1.weight")
    shards = [fused_rank(fc1, (gate, up), spec, tp, r) for r in range(tp)]
    for r, piece in enumerate(shards):  # SwiGLU chunks each rank's output in two: gate, up
        g, u = piece.chunk(2)
        assert torch.equal(g, gate[r * per_rank:(r + 1) * per_rank])
        assert torch.equal(u, up[r * per_rank:(r + 1) * per_rank])
    merged_gate, merged_up = merge_fused(fc1, shards, spec)
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


@pytest.mark.parametrize("split", ["qkv", "columns", ""])
def test_an_unknown_split_raises_naming_it(split) -> None:
    spec, x = _spec(2, 2, 2, 4), torch.zeros(4, 4)
    with pytest.raises(InputError, match=f"unknown Megatron split '{split}'"):
        shard(split, [x], spec, 2, 0, 8)
    with pytest.raises(InputError, match=f"unknown Megatron split '{split}'"):
        unshard(split, [x, x], spec, "here")
