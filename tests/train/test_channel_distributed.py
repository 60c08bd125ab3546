"""Channel loss across 2 real gloo ranks: gradient accumulation 4, packed rows, and a
channel that one rank never sees (nor registers) — no hang, and the sums are exact."""

from __future__ import annotations

import torch
from packed import packed_rows

WORLD, ACCUM, VOCAB = 2, 4, 61
# References computed by transformers in float32 agree to float32 rounding (assert_close's
# float32 defaults); our float64 sums add up tighter, checked at the float64 defaults.
FP32 = {"rtol": 1.3e-6, "atol": 1e-5}


def _micro_batch(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Packed rows of rank `rank`: input_ids, labels, a channel name per token."""
    g = torch.Generator().manual_seed(10 * rank + micro)
    length = int(torch.randint(6, 14, (1,), generator=g))
    pool = ["code", "web", "only-rank-0"] if rank == 0 else ["code", "web"]
    input_ids, labels, names = packed_rows(g, 2, length, VOCAB, pool, margin=1)
    if rank == 0 and micro == 0:  # make sure the rank-0-only channel has tokens in the loss
        names[0] = ["only-rank-0"] * length
        labels[0] = input_ids[0]
    return input_ids, labels, names


def _reference(model, windows: list[list[tuple[int, int]]]) -> list[dict]:
    """transformers' own loss, per window, over every rank's micro-batches."""
    out = []
    for window in windows:
        sums: dict[str | None, list[float]] = {}
        for rank, micro in window:
            input_ids, labels, names = _micro_batch(rank, micro)
            for name in [None, *{n for row in names for n in row}]:
                mine = (
                    labels
                    if name is None
                    else labels.masked_fill(torch.tensor([[n != name for n in row] for row in names]), -100)
                )
                count = int((mine[:, 1:] != -100).sum())
                if count:
                    with torch.no_grad():
                        mean = model(input_ids, labels=mine).loss.item()
                    s = sums.setdefault(name, [0.0, 0])
                    s[0] += mean * count
                    s[1] += count
        out.append({k: (v[0] / v[1], v[1]) for k, v in sums.items()})
    return out


def _worker(rank: int, world: int, port: int, model) -> None:
    import torch.distributed as dist
    from procs import join_gloo

    from reference.train.accumulator import ChannelLossAccumulator, causal_lm_token_losses

    join_gloo(rank, world, port)
    acc = ChannelLossAccumulator()  # names are registered as this rank meets them

    def step(micro: int) -> None:
        input_ids, labels, names = _micro_batch(rank, micro)
        ids = torch.tensor([[acc.channel_id(n) for n in row] for row in names])
        with torch.no_grad():
            logits = model(input_ids).logits
        acc.add(*causal_lm_token_losses(logits, labels, ids))

    for micro in range(ACCUM):
        step(micro)
    assert ("only-rank-0" in acc.names) == (rank == 0)  # rank 1 never registered it
    first = acc.reduce()
    if rank == 0:
        step(ACCUM)  # second window: rank 1 brings no tokens at all
    second = acc.reduce()

    windows = [[(r, m) for r in range(world) for m in range(ACCUM)], [(0, ACCUM)]]
    for report, expected in zip([first, second], _reference(model, windows), strict=True):
        assert sorted(report.channels) == sorted(k for k in expected if k is not None)
        assert report.tokens == expected[None][1]
        torch.testing.assert_close(report.loss, expected[None][0], **FP32)
        for name, stat in report.channels.items():
            assert stat.tokens == expected[name][1]
            torch.testing.assert_close(stat.loss, expected[name][0], **FP32)
        weighted = sum(s.loss * s.tokens for s in report.channels.values())
        assert sum(s.tokens for s in report.channels.values()) == report.tokens
        torch.testing.assert_close(weighted / report.tokens, report.loss)
    assert "only-rank-0" in first.channels
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_grad_accum_packing_absent_channel(spawn_ranks) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    # fork: both ranks inherit the same model and the parent's imports.
    spawn_ranks(_worker, WORLD, model, timeout_s=90, method="fork")
