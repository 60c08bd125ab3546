"""Channel loss: (sum of token losses, token count) per channel, divided once, at log time.

Averaging means (per micro-batch, per step, per rank) and then averaging the averages gives
per-channel numbers that do not add up to the global loss. Here every micro-batch adds sums
and counts, on device and without a host sync; `reduce` unions the channel names across
ranks with `all_gather_object`, zero-fills, does one all-reduce over the data-parallel group
and only then divides. So, for every report, sum_c(tokens_c * loss_c) / sum_c tokens_c is
the global loss, up to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100  # transformers' and PyTorch's default ignore index
NO_CHANNEL = -1  # channel id of padding; such tokens must also be masked out of the loss


@dataclass(frozen=True, kw_only=True)
class ChannelStat:
    """Mean token loss and token count of one channel over one logging window."""

    loss: float
    tokens: int


@dataclass(frozen=True, kw_only=True)
class ChannelLossReport:
    """One logging window, summed over micro-batches, accumulation steps and ranks."""

    loss: float
    tokens: int
    channels: dict[str, ChannelStat] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSONL record of this window, without the step. A window with no token has no
        mean: its loss is null, since NaN is not JSON (jq and browsers reject it)."""
        return {
            "loss": None if math.isnan(self.loss) else self.loss,
            "tokens": self.tokens,
            "channels": {c: {"loss": s.loss, "tokens": s.tokens} for c, s in self.channels.items()},
        }

    def to_logs(self) -> dict[str, float]:
        """The window as a trainer's log values: loss, tokens, loss/<channel>, tokens/<channel>."""
        logs: dict[str, float] = {"loss": self.loss, "tokens": self.tokens}
        for name, stat in self.channels.items():
            logs[f"loss/{name}"] = stat.loss
            logs[f"tokens/{name}"] = stat.tokens
        return logs

    @classmethod
    def from_logs(cls, logs: Mapping[str, Any]) -> ChannelLossReport:
        """The window `to_logs` put into a log; the log's other values are ignored."""
        names = [key.removeprefix("loss/") for key in logs if key.startswith("loss/")]
        channels = {n: ChannelStat(loss=logs[f"loss/{n}"], tokens=logs[f"tokens/{n}"]) for n in names}
        return cls(loss=logs["loss"], tokens=logs["tokens"], channels=channels)


def shift_like_causal_lm(
    labels: torch.Tensor, channel_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift labels and per-token channel ids exactly as transformers' `ForCausalLMLoss` does.

    Position t predicts label t+1, so a loss term belongs to the channel of its target token.
    """
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_channels = F.pad(channel_ids, (0, 1), value=NO_CHANNEL)[..., 1:]
    return shift_labels, shift_channels


def causal_lm_token_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    channel_ids: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = 2**26,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token fp32 losses, channel ids and loss mask, flat, with transformers' shift and mask.

    logits: (B, T, V); labels and channel_ids: (B, T), aligned with the inputs. Rows go through
    in chunks of about `chunk_elements` logits, so the fp32 temporaries stay bounded (256 MiB
    by default) however large the vocabulary and the batch.
    """
    shift_labels, shift_channels = shift_like_causal_lm(labels, channel_ids, ignore_index)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, chunk_elements // logits.shape[-1])
    # fp32 like ForCausalLMLoss; ignored positions come back as exactly 0.
    losses = torch.cat(
        [
            F.cross_entropy(x.float(), y, ignore_index=ignore_index, reduction="none")
            for x, y in zip(flat.split(rows), shift_labels.split(rows), strict=True)
        ]
    )
    return losses, shift_channels.reshape(-1).to(logits.device), shift_labels != ignore_index


class ChannelLossAccumulator:
    """Carries (loss sum, token count) per channel and overall through one logging window."""

    def __init__(self, names: Iterable[str] = (), device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        # float64 on device: counts stay exact to 2**53, sums lose nothing a report can show,
        # and sums and counts can travel in one all-reduce.
        self._sums = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._counts = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum, count)
        for name in names:
            self.channel_id(name)

    def channel_id(self, name: str) -> int:
        """The local id of channel `name`, registering it on first sight."""
        if name not in self._index:
            if not isinstance(name, str) or not name:
                raise ValueError(f"channel names must be non-empty strings, got {name!r}")
            self._index[name] = len(self.names)
            self.names.append(name)
            pad = torch.zeros(1, dtype=torch.float64, device=self.device)
            self._sums = torch.cat([self._sums, pad])
            self._counts = torch.cat([self._counts, pad])
        return self._index[name]

    @torch.no_grad()
    def add(self, token_losses: torch.Tensor, channel_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one micro-batch: per-token losses, local channel ids and loss mask, same shape."""
        mask = mask.reshape(-1).to(self.device)
        losses = torch.where(mask, token_losses.reshape(-1).to(self.device, torch.float64), 0.0)
        # Masked tokens (padding has NO_CHANNEL) add zero to channel 0; a counted token with no
        # valid channel id makes index_add_ raise rather than vanish from the channel sums.
        ids = torch.where(mask, channel_ids.reshape(-1).to(self.device), 0)
        weights = mask.to(torch.float64)
        self._sums.index_add_(0, ids, losses)
        self._counts.index_add_(0, ids, weights)
        self._total += torch.stack([losses.sum(), weights.sum()])

    def reduce(self, group: dist.ProcessGroup | None = None) -> ChannelLossReport:
        """Sum the window over `group` (the data-parallel group), divide once, and reset.

        Collective: every rank of `group` must call it, whatever channels it has seen.
        """
        names = sorted(self.names)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            gathered: list[list[str] | None] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self.names, group=group)
            # Union, sorted, so that every rank lays out the same vector.
            names = sorted({n for rank_names in gathered for n in rank_names or ()})
        for name in names:
            self.channel_id(name)  # zero-fill channels this rank has not seen
        order = torch.tensor([self._index[n] for n in names], dtype=torch.long, device=self.device)
        packed = torch.cat([self._total, self._sums[order], self._counts[order]])
        if distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        values = packed.tolist()
        self.reset()

        total_sum, total_count = values[0], values[1]
        sums, counts = values[2 : 2 + len(names)], values[2 + len(names) :]
        channels = {
            name: ChannelStat(loss=s / c, tokens=round(c))
            for name, s, c in zip(names, sums, counts, strict=True)
            if c > 0  # a channel no rank saw in this window has no loss to report
        }
        loss = total_sum / total_count if total_count > 0 else float("nan")
        return ChannelLossReport(loss=loss, tokens=round(total_count), channels=channels)

    def reset(self) -> None:
        """Start a new logging window; channel names are kept."""
        self._sums.zero_()
        self._counts.zero_()
        self._total.zero_()
