"""Sequence parallelism on real gloo ranks against one process: each rank's logits and the
gradient of its slice of the input embeddings equal the single-process run's slice (fp32,
assert_close defaults), Ulysses and ring, MHA and GQA, windows shorter than the sequence,
lengths the degree does not divide, latent attention (MLA: v's head dim its own), and a batch
with a left- and a right-padded row. The ring's
zigzag layout balances the causal work: counted per rank as it runs. A representative handful:
each case spawns its ranks; the larger matrix is in test_sequence_parallel_matrix.py (the
equivalence gate)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from procs import spawn

from reference.modeling import UnifiedForCausalLM, sequence_parallel
from reference.modeling.config import UnifiedConfig
from reference.modeling.sequence_parallel import contiguous, schedule, zigzag

BATCH = 2


def build(backend: str, **features: Any) -> UnifiedForCausalLM:
    """A family's tiny spec (`family`, llama by default) with `features` changed (`v_dim`: MLA's),
    weights from seed 0 (the same on every rank)."""
    from harness import tiny_spec

    family = features.pop("family", "llama")
    spec = tiny_spec(family, False)
    if "v_dim" in features:  # MLA: values with a head dim of their own
        spec = spec.replace(mla=dataclasses.replace(spec.mla, v_dim=features.pop("v_dim")))
    spec = spec.replace(**features)
    torch.manual_seed(0)
    model = UnifiedForCausalLM(UnifiedConfig.from_spec(spec, attn_implementation=backend))
    return model.eval()


def run(model: UnifiedForCausalLM, embeds: torch.Tensor, weights: torch.Tensor,
        attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the gradient of sum(logits * weights) with respect to the input embeddings."""
    embeds = embeds.detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    (logits * weights).sum().backward()
    return logits.detach(), embeds.grad


def padding(seq: int) -> torch.Tensor:
    """(2, seq): row 0 left-padded by 3, row 1 right-padded by 2."""
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    mask[0, :3], mask[1, -2:] = 0, 0
    return mask


def score_elements(run: Any) -> list[int]:
    """Wrap the ring's block attention in this process; the list fills with the score elements
    (query x key pairs, per batch row and head) of each block it computes."""
    counts: list[int] = []

    def counted(q: torch.Tensor, k: torch.Tensor, *args: Any) -> Any:
        counts.append(q.shape[2] * k.shape[2])
        return run(q, k, *args)

    sequence_parallel._attend = counted
    return counts


def _worker(rank: int, world: int, port: int, mode: str, seq: int, backend: str, features: dict) -> None:
    from procs import join_gloo

    join_gloo(rank, world, port)
    model = build(backend, **features)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(BATCH, seq, model.spec.hidden_size, generator=g)
    weights = torch.randn(BATCH, seq, model.spec.vocab_size, generator=g)
    mask = padding(seq)
    real = weights * mask[..., None]  # the loss reads real positions only
    logits, grad = run(model, embeds, weights)  # the whole sequence in this process
    padded_logits, padded_grad = run(model, embeds, real, mask)

    model.enable_sequence_parallel(mode=mode)
    counts = score_elements(sequence_parallel._attend)
    mine = torch.arange(seq).tensor_split(world)[rank]
    sp_logits, sp_grad = run(model, embeds[:, mine], weights[:, mine])
    torch.testing.assert_close(sp_logits, logits[:, mine])
    torch.testing.assert_close(sp_grad, grad[:, mine])
    sp_logits, sp_grad = run(model, embeds[:, mine], real[:, mine], mask[:, mine])
    keep = mask[:, mine].bool()
    torch.testing.assert_close(sp_logits[keep], padded_logits[:, mine][keep])
    torch.testing.assert_close(sp_grad, padded_grad[:, mine])  # zero at padding in both

    if mode == "ring" and seq % (2 * world) == 0:  # balanced: every rank computes as many scores
        import torch.distributed as dist

        work = [None] * world
        dist.all_gather_object(work, sum(counts))
        assert min(work) > 0 and max(work) <= 1.1 * min(work), work  # counted, and level


GQA = {"num_heads": 8, "num_kv_heads": 2}  # 4 ranks: KV heads repeated for Ulysses
MHA = {"num_heads": 4, "num_kv_heads": 4}
WINDOW = {"sliding_window": 4, "window_layers": (0,)}  # layer 0 windowed, layer 1 full
MLA = {"family": "deepseek_v2", "v_dim": 12}  # latent attention: q/k head dim 16, v's 12
CASES = [  # world, mode, seq, backend, features
    (2, "ulysses", 11, "sdpa", {**MHA, **WINDOW}),
    (4, "ulysses", 13, "eager", {**GQA, "alibi": True, "attn_softcap": 5.0}),
    (2, "ring", 11, "sdpa", {**GQA, **WINDOW}),
    (2, "ring", 10, "sdpa", MLA),
    (4, "ring", 16, "eager", {**MHA, **WINDOW, "attn_softcap": 5.0}),
]


@pytest.mark.parametrize(("world", "mode", "seq", "backend", "features"), CASES,
                         ids=[f"{w}-{m}-{s}-{b}-{'+'.join(f)}" for w, m, s, b, f in CASES])
def test_sequence_parallel_equals_one_process(world: int, mode: str, seq: int, backend: str,
                                              features: dict) -> None:
    spawn(_worker, world, mode, seq, backend, features, timeout_s=180)


def _refusals(rank: int, world: int, port: int) -> None:
    from procs import join_gloo

    join_gloo(rank, world, port)
    model = build("sdpa", num_heads=6, num_kv_heads=2)  # 6 heads: 4 does not divide them
    with pytest.raises(ValueError, match="6 attention heads are not divisible by the degree 4"):
        model.enable_sequence_parallel(mode="ulysses")
    with pytest.raises(ValueError, match="mode 'tree'"):
        model.enable_sequence_parallel(mode="tree")
    model.enable_sequence_parallel(mode="ring")  # ring has no such constraint
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, use_cache=True)
    with pytest.raises(ValueError, match="probes do not combine"), model.record():
        pass
    with pytest.raises(ValueError, match=r"tensor_split splits it: \[4, 4, 3, 3\]"):
        model(torch.zeros(1, 3 + (rank == 0) * 2, dtype=torch.long))  # 5, 3, 3, 3


def test_what_does_not_combine_is_refused_by_name() -> None:
    spawn(_refusals, 4, timeout_s=120)


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_balances_what_the_contiguous_split_does_not(world: int) -> None:
    """The pairs the ring schedules, in score elements per rank, at a length 2n divides: equal
    under the zigzag layout; the same skipping on contiguous slices gives the last rank n times
    the first's work. Each layout covers every position once, and every query-key pair with the
    key at or before the query is in exactly one scheduled pair of runs."""
    seq = 16 * world

    def work(runs: list[list[range]]) -> list[int]:
        per_rank = []
        for rank in range(world):
            pairs = [(runs[rank][i], runs[(rank - step) % world][j])
                     for step, todo in enumerate(schedule(runs, rank)) for i, j in todo]
            per_rank.append(sum(len(q) * len(k) for q, k in pairs))
            covered = {(a, b) for q, k in pairs for a in q for b in k if b <= a}
            assert len(covered) == sum(len(r) * (r.start + r.stop + 1) // 2 for r in runs[rank])
        return per_rank

    for runs in zigzag(seq, world), contiguous(seq, world):
        assert sorted(p for rank in runs for r in rank for p in r) == list(range(seq))
    balanced, unbalanced = work(zigzag(seq, world)), work(contiguous(seq, world))
    assert max(balanced) / min(balanced) <= 1.1, balanced
    assert max(unbalanced) / min(unbalanced) >= 0.9 * world, unbalanced
    assert sum(balanced) < sum(unbalanced)  # fewer of the zigzag's pairs are partly masked
