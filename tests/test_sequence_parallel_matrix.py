"""The larger sequence-parallel matrix, in the equivalence gate (nox -s equivalence): the same
check as tests/test_sequence_parallel.py (logits and input-embedding gradients equal one
process, unpadded and with a left- and a right-padded row) over more combinations: the ring's
zigzag with ALiBi, GQA and both backends, lengths 2n does not divide, a sequence shorter than
2n (empty zigzag chunks), Ulysses with KV heads repeated and windows, MLA in both modes. Gate
only (many multi-process jobs): it runs with REFERENCE_EQUIVALENCE=1, which `nox -s equivalence`
sets."""

from __future__ import annotations

import os

import pytest
from procs import spawn
from test_sequence_parallel import GQA, MHA, MLA, WINDOW, _worker

pytestmark = pytest.mark.skipif(os.environ.get("REFERENCE_EQUIVALENCE") != "1",
                                reason="the equivalence gate's matrix (REFERENCE_EQUIVALENCE=1)")

CASES = [  # world, mode, seq, backend, features
    (2, "ring", 12, "eager", {**GQA, "alibi": True}),
    (2, "ring", 9, "sdpa", {**MHA}),
    (4, "ring", 13, "sdpa", {**GQA, **WINDOW}),
    (4, "ring", 6, "eager", {**GQA, "alibi": True, "attn_softcap": 5.0}),
    (4, "ring", 24, "eager", {"num_heads": 6, "num_kv_heads": 3, **WINDOW}),
    (2, "ulysses", 12, "eager", {**GQA, "alibi": True, **WINDOW}),
    (4, "ulysses", 14, "sdpa", {**GQA, **WINDOW}),
    (4, "ulysses", 9, "sdpa", {**MHA}),
    (2, "ulysses", 9, "eager", MLA),
    (4, "ring", 13, "eager", MLA),
]


@pytest.mark.parametrize(("world", "mode", "seq", "backend", "features"), CASES,
                         ids=[f"{w}-{m}-{s}-{b}-{'+'.join(f)}" for w, m, s, b, f in CASES])
def test_sequence_parallel_matrix(world: int, mode: str, seq: int, backend: str, features: dict) -> None:
    spawn(_worker, world, mode, seq, backend, features, timeout_s=300)
