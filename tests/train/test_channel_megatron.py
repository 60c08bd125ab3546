"""Channel loss on real megatron-core: TP 2 x PP 2 x DP 2 under gloo on the CPU.

Each last-stage rank runs megatron-core's GPTModel with labels (per-token loss from
vocab_parallel_cross_entropy), feeds `channel_loss_func` over 2 micro-batches of packed
rows, and reduces with `reduce_channel_loss`. The reference is transformers' own
`ForCausalLMLoss` on the TP-gathered logits of the same rows, summed over the DP ranks.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is the optional [megatron] extra")

TP, PP, DP = 2, 2, 2
VOCAB, SEQ, BATCH, MICRO = 64, 12, 2, 2
# References computed by transformers in float32 agree to float32 rounding (assert_close's
# float32 defaults); our float64 sums add up tighter, checked at the float64 defaults.
FP32 = {"rtol": 1.3e-6, "atol": 1e-5}


def _rows(dp_rank: int, micro: int) -> tuple:
    """Packed rows: (input_ids, labels, channel names per token); 'rare' only on DP rank 0."""
    import torch
    from packed import packed_rows

    g = torch.Generator().manual_seed(100 * dp_rank + micro)
    pool = ["alpha", "beta", "rare"] if dp_rank == 0 else ["alpha", "beta"]
    return packed_rows(g, BATCH, SEQ, VOCAB, pool, margin=3)


def _worker(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from mcore_cpu import CPU_CONFIG, side_steps
    from procs import join_gloo

    join_gloo(rank, world, port)
    side_steps()  # test-only: megatron-core's CUDA assumptions
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from transformers.loss.loss_utils import ForCausalLMLoss

    from reference.train.accumulator import ChannelLossAccumulator
    from reference.train.megatron_loss import (
        channel_loss_func,
        megatron_targets,
        reduce_channel_loss,
    )

    ps.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    dp_rank = ps.get_data_parallel_rank()
    torch.manual_seed(0)  # same full weights on every rank; each keeps its shard
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=PP,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_CONFIG,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=first,
        post_process=last,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    causal = torch.triu(torch.ones(SEQ, SEQ), diagonal=1).bool()[None, None]  # True = masked
    peer = ps.get_pipeline_model_parallel_next_rank() if first else None
    source = ps.get_pipeline_model_parallel_prev_rank() if last else None

    accumulator = ChannelLossAccumulator()
    expected = {}  # channel (or None for global) -> [sum, count], from transformers' loss
    for micro in range(MICRO):
        input_ids, labels, names = _rows(dp_rank, micro)
        if first:
            hidden = model(input_ids, position_ids, attention_mask=causal)  # (S, B, H)
            dist.send(hidden.detach().contiguous(), peer)
            continue
        hidden = torch.empty(SEQ, BATCH, config.hidden_size)
        dist.recv(hidden, source)
        channel_ids = torch.tensor([[accumulator.channel_id(n) for n in row] for row in names])
        mlabels, loss_mask, mchannels = megatron_targets(labels, channel_ids)
        model.set_input_tensor(hidden)
        token_loss = model(None, position_ids, attention_mask=causal, labels=mlabels)  # (B, S)
        loss, num_tokens, reporting = channel_loss_func(accumulator, loss_mask, mchannels, token_loss)
        loss.backward()  # the loss function is the one training differentiates
        assert int(num_tokens) == int((labels[:, 1:] != -100).sum())
        assert reporting["lm loss"].tolist() == [loss.item(), float(num_tokens)]

        # Reference: full logits from the TP shards, through transformers' own loss.
        model.set_input_tensor(hidden)
        with torch.no_grad():
            shard = model(None, position_ids, attention_mask=causal)  # (B, S, V / TP)
        shards = [torch.empty_like(shard) for _ in range(TP)]
        dist.all_gather(shards, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(shards, dim=-1)
        for name in [None, *sorted({n for row in names for n in row})]:
            mine = (
                labels
                if name is None
                else labels.masked_fill(torch.tensor([[n != name for n in row] for row in names]), -100)
            )
            count = int((mine[:, 1:] != -100).sum())
            total = ForCausalLMLoss(logits, mine, VOCAB, num_items_in_batch=1).double()
            sums = expected.setdefault(name, [0.0, 0])
            sums[0] += total.item()
            sums[1] += count

    report = reduce_channel_loss(accumulator)
    if last:
        _check(report, expected)
    else:
        assert report is None
    dist.barrier()  # rank 0 hosts the store: nobody leaves before the checks are done
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _check(report, expected: dict) -> None:
    """The reduced report against transformers' loss summed over DP, on a last-stage rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    # The reference, summed over the data-parallel group only.
    keys = [None, "alpha", "beta", "rare"]
    packed = torch.tensor([v for k in keys for v in expected.get(k, [0.0, 0])], dtype=torch.float64)
    dist.all_reduce(packed, group=ps.get_data_parallel_group())
    reference = dict(zip(keys, packed.view(-1, 2).tolist(), strict=True))
    assert sorted(report.channels) == ["alpha", "beta", "rare"]  # 'rare' unseen on DP rank 1
    assert report.tokens == reference[None][1]
    torch.testing.assert_close(report.loss, reference[None][0] / reference[None][1], **FP32)
    for name, stat in report.channels.items():
        assert stat.tokens == reference[name][1]
        torch.testing.assert_close(stat.loss, reference[name][0] / reference[name][1], **FP32)
    weighted = sum(s.loss * s.tokens for s in report.channels.values())
    assert sum(s.tokens for s in report.channels.values()) == report.tokens
    torch.testing.assert_close(weighted / report.tokens, report.loss)
    # Tensor-parallel ranks agree to the bit: no reduction over TP is needed.
    both = [None] * TP
    dist.all_gather_object(both, report.to_json(), group=ps.get_tensor_model_parallel_group())
    assert both[0] == both[1]


def test_megatron_tp2_pp2_dp2_channel_loss_matches_transformers(spawn_ranks) -> None:
    # Import once here; the forked ranks inherit the modules.
    import megatron.core.models.gpt  # noqa: F401
    import transformers.loss.loss_utils  # noqa: F401

    spawn_ranks(_worker, TP * PP * DP, timeout_s=60, method="fork")
