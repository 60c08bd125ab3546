"""Megatron-core integration: a `loss_func` that also feeds the channel accumulator.

On the last pipeline stage megatron-core's `GPTModel(..., labels=labels)` returns the
per-token loss `[b, s]` from `tensor_parallel.vocab_parallel_cross_entropy`, identical on
every tensor-parallel rank. `channel_loss_func` follows Megatron-LM's `loss_func` contract
(loss sum, token count, reporting dict) and adds those per-token losses to the accumulator;
`reduce_channel_loss` reduces it over the data-parallel (x context-parallel) group only,
because tensor-parallel ranks already agree and only the last stage owns the loss.

    forward_step returns: output, partial(channel_loss_func, accumulator, loss_mask, channel_ids)
    at log time, every rank: report = reduce_channel_loss(accumulator)  # None off the last stage
"""

from __future__ import annotations

import torch

from reference.train.accumulator import (
    IGNORE_INDEX,
    ChannelLossAccumulator,
    ChannelLossReport,
    shift_like_causal_lm,
)


def megatron_targets(
    labels: torch.Tensor, channel_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers-style (B, T) labels and per-input channels -> Megatron's target-aligned
    (labels, loss_mask, channel_ids), with transformers' shift and ignore mask."""
    shift_labels, shift_channels = shift_like_causal_lm(labels, channel_ids, ignore_index)
    loss_mask = shift_labels != ignore_index
    # vocab_parallel_cross_entropy has no ignore index: masked positions need a valid token id.
    return shift_labels.masked_fill(~loss_mask, 0), loss_mask.float(), shift_channels


def channel_loss_func(
    accumulator: ChannelLossAccumulator,
    loss_mask: torch.Tensor,
    channel_ids: torch.Tensor,
    output_tensor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron-LM's loss_func: (masked loss sum, token count, {"lm loss": [sum, count]}).

    `output_tensor` is the per-token loss `[b, s]`; `loss_mask` and `channel_ids` are aligned
    with it (see `megatron_targets`).
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1) > 0
    loss = torch.where(mask, losses, 0.0).sum()
    num_tokens = mask.sum().to(torch.int)
    accumulator.add(losses.detach(), channel_ids, mask)
    reporting = torch.cat([loss.detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": reporting}


def reduce_channel_loss(accumulator: ChannelLossAccumulator) -> ChannelLossReport | None:
    """The window's channel loss on the last pipeline stage, reduced over DP x CP; else None.

    Collective over the data-parallel group: every last-stage rank must call it.
    """
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return accumulator.reduce(group=group)
