"""A mixture of experts in place of the MLP (spec.moe), computed as transformers' eager
experts loop computes it, so that logits match it in fp32 and in bf16.

    w, idx = topk(softmax(router(x)), top_k)     # per token, fp32; renormalised if norm_topk_prob
    y = sum over chosen experts e of w_e * expert_e(x)   # expert by expert, index_add in order
    y = y + sigmoid(shared_gate(x)) * shared(x)  # Qwen2-MoE's shared expert, where it has one
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from reference.families.spec import ModelSpec


class MoE(nn.Module):
    """Router, experts (each a gated MLP of `mlp(size)`) and the optional shared expert."""

    def __init__(self, spec: ModelSpec, mlp: Callable[[int], nn.Module]) -> None:
        super().__init__()
        m = spec.moe
        if m is None:
            raise ValueError(f"num_experts={spec.num_experts} without a routing record (spec.moe): "
                             "the unified model cannot compute these experts")
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = nn.ModuleList(mlp(m.expert_size) for _ in range(spec.num_experts))
        if m.shared_size:
            self.shared = mlp(m.shared_size)
            self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.top_k, self.renormalise, self.fp32_weights = m.top_k, m.norm_topk_prob, m.fp32_weights
        self.has_shared = bool(m.shared_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top_k experts (N, k) and their weights (N, k), for x (N, hidden)."""
        logits = self.router(x)  # (N, E)
        weights, chosen = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights if self.fp32_weights else weights.to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        x = x.reshape(-1, h)  # (N, hidden), N = B * T
        chosen, weights = self.route(x)
        out = torch.zeros_like(x)
        hit = torch.zeros(len(self.experts), dtype=torch.bool, device=x.device)
        hit[chosen.flatten()] = True
        for e in hit.nonzero().flatten().tolist():  # in expert order, as transformers' loop adds them
            token, slot = torch.where(chosen == e)
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self.has_shared:
            out = out + F.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.view(b, t, h)
