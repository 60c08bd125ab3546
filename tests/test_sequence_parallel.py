"""Sequence parallelism on real gloo ranks against one process: each rank's logits and the
gradient of its slice of the input embeddings equal the single-process run's slice (fp32,
assert_close defaults), Ulysses and ring, MHA and GQA, windows shorter than the sequence, and
lengths the degree does not divide. A representative handful: each case spawns its ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from procs import spawn

from reference.modeling import UnifiedForCausalLM
from reference.modeling.config import UnifiedConfig

BATCH = 2


def build(backend: str, **features: Any) -> UnifiedForCausalLM:
    """llama's tiny spec with `features` changed, weights from seed 0 (the same on every rank)."""
    from harness import tiny_spec

    spec = tiny_spec("llama", False).replace(**features)
    torch.manual_seed(0)
    model = UnifiedForCausalLM(UnifiedConfig.from_spec(spec, attn_implementation=backend))
    return model.eval()


def run(model: UnifiedForCausalLM, embeds: torch.Tensor,
        weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the gradient of sum(logits * weights) with respect to the input embeddings."""
    embeds = embeds.detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    (logits * weights).sum().backward()
    return logits.detach(), embeds.grad


def _worker(rank: int, world: int, port: int, mode: str, seq: int, backend: str, features: dict) -> None:
    from procs import join_gloo

    join_gloo(rank, world, port)
    model = build(backend, **features)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(BATCH, seq, model.spec.hidden_size, generator=g)
    weights = torch.randn(BATCH, seq, model.spec.vocab_size, generator=g)
    logits, grad = run(model, embeds, weights)  # the whole sequence in this process

    model.enable_sequence_parallel(mode=mode)
    mine = torch.arange(seq).tensor_split(world)[rank]
    sp_logits, sp_grad = run(model, embeds[:, mine], weights[:, mine])
    torch.testing.assert_close(sp_logits, logits[:, mine])
    torch.testing.assert_close(sp_grad, grad[:, mine])


GQA = {"num_heads": 8, "num_kv_heads": 2}  # 4 ranks: KV heads repeated for Ulysses
MHA = {"num_heads": 4, "num_kv_heads": 4}
WINDOW = {"sliding_window": 4, "window_layers": (0,)}  # layer 0 windowed, layer 1 full
CASES = [  # world, mode, seq, backend, features
    (2, "ulysses", 11, "sdpa", {**MHA, **WINDOW}),
    (4, "ulysses", 13, "eager", {**GQA, "alibi": True, "attn_softcap": 5.0}),
    (2, "ring", 11, "sdpa", {**GQA, **WINDOW}),
    (4, "ring", 14, "eager", {**MHA, **WINDOW, "attn_softcap": 5.0}),
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
