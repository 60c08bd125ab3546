"""UnifiedForRewardModel: the unified trunk with a scalar value head, for reward modelling
and PPO-style value estimates.

    values = score(norm(trunk(ids)))          # (B, T): one value per token
    reward = values[b, last attended token]   # (B, 1), the row's last position with mask 1

It reads and writes what `<Family>ForSequenceClassification` (num_labels=1) does: the causal
LM's trunk under the same names and `score.weight`, (1, hidden), no bias. transformers pools at
the last token that is not the pad id, which skips a real eos when pad == eos; here the pool is
by the attention mask, so it is right with left or right padding whatever the pad id is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from reference.modeling.config import UnifiedConfig
from reference.modeling.model import UnifiedModel


def last_attended(attention_mask: torch.Tensor | None, batch: int, length: int,
                  device: torch.device) -> torch.Tensor:
    """(B,) index of each row's last position whose mask is 1 (length - 1 with no mask)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, device=device)
    positions = torch.arange(length, device=device)
    return (positions * attention_mask.to(device).long()).argmax(-1)


class UnifiedForRewardModel(UnifiedModel):
    """A reward (value) model of any dense family: the unified trunk and `score`, one output."""

    def __init__(self, config: UnifiedConfig) -> None:
        super().__init__(config)
        self.num_labels = 1
        self.score = nn.Linear(self.spec.hidden_size, 1, bias=False)
        self.post_init()

    def _heads(self) -> list[nn.Module]:
        return [self.score]

    def values(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: Cache | None = None,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) the value head read at every token (PPO's per-token values)."""
        x = self.trunk(input_ids, attention_mask, position_ids, cache, inputs_embeds)  # (B, T, hidden)
        return self.score(x.to(self.score.weight.device)).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        """logits (B, 1): the value at each row's last attended token; with `labels` (B,), the
        mean squared error, as transformers' regression head (num_labels=1) computes it."""
        values = self.values(input_ids, attention_mask, position_ids, None, inputs_embeds)  # (B, T)
        b, t = values.shape
        last = last_attended(attention_mask, b, t, values.device)
        logits = values[torch.arange(b, device=values.device), last][:, None]  # (B, 1)
        loss = None
        if labels is not None:
            loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.device, logits.dtype).view(-1))
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)
