"""HF Trainer integration: `loss/<channel>` and `tokens/<channel>` inside the trainer's `log()`.

The numbers go into the logs dict that `Trainer.log()` hands to every sink, so
`log_history`, TensorBoard and the JSONL callback see the same values. The logged `loss` is
replaced by the window's token-weighted loss: with `logging_steps=1` that is the Trainer's
own value (it normalises by `num_items_in_batch`); over a longer window the Trainer would
average per-step means, which the channel numbers could not add up to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from reference.train.accumulator import ChannelLossAccumulator, ChannelLossReport, causal_lm_token_losses

CHANNEL_IDS = "channel_ids"  # batch key: (B, T) channel id per input token, -1 for padding


class ChannelLossMixin:
    """Mix into a `transformers.Trainer` whose batches carry `channel_ids` next to `labels`.

    `channel_ids[b, t]` is the channel of input token t (-1 on padding), an index into
    `channel_names`; the loss term that predicts token t counts for that channel.
    """

    def __init__(self, *args: Any, channel_names: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sizes = tuple(getattr(self, f"get_{p}_size", lambda: 1)() for p in ("tp", "cp", "sp"))
        if max(sizes) > 1:
            # All ranks are reduced over; replicated ranks would count their tokens twice.
            raise ValueError(f"channel loss supports data parallelism only, got tp/cp/sp {sizes}")
        self.channel_loss = ChannelLossAccumulator(channel_names, device=self.args.device)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The Trainer's own loss, plus per-token losses into the channel accumulator."""
        inputs = dict(inputs)
        channel_ids = inputs.pop(CHANNEL_IDS, None)
        labels = inputs.get("labels")
        if model.training and (channel_ids is None or labels is None):
            raise ValueError(f"channel loss needs '{CHANNEL_IDS}' and 'labels' in every batch")
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:  # evaluation shares compute_loss but not the training window
            with torch.no_grad():
                losses, ids, mask = causal_lm_token_losses(outputs.logits.detach(), labels, channel_ids)
                self.channel_loss.add(losses, ids, mask)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the window's channel losses to a training log; every rank calls this."""
        if "loss" in logs:
            report = self.channel_loss.reduce()  # default group: under DDP every rank is DP
            logs = {**logs, **report.to_logs()}
        super().log(logs, start_time)


class ChannelLossTrainer(ChannelLossMixin, Trainer):
    """`transformers.Trainer` with channel loss."""


def record_from_logs(logs: dict[str, Any], step: int) -> dict[str, Any]:
    """The JSONL record of one training log: step, global loss and tokens, and each channel."""
    return {"step": step, **ChannelLossReport.from_logs(logs).to_json()}


class ChannelLossJsonlCallback(TrainerCallback):
    """Appends one JSON line per training log to `path`, on the main process only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        """Write the record if this log carries the channel loss."""
        if state.is_world_process_zero and logs is not None and "tokens" in logs:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record_from_logs(logs, state.global_step), allow_nan=False) + "\n")
