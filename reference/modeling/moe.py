"""A mixture of experts in place of the MLP (spec.moe), computed as transformers' eager
experts loop computes it, so that logits match it in fp32 and in bf16.

    s = softmax(router(x))                       # per token, fp32; sigmoid for DeepSeek-V3
    idx = topk(s + choice_bias, top_k)           # within the best groups of experts, if grouped
    w = s[idx] * scale                           # renormalised first if norm_topk_prob
    y = sum over chosen experts e of w_e * expert_e(x)   # expert by expert, index_add in order
    y = y + sigmoid(shared_gate(x)) * shared(x)  # Qwen2-MoE's shared expert, where it has one
                                                 # (DeepSeek's: ungated)
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
        if m.choice_bias:  # DeepSeek-V3's e_score_correction_bias: stored, never trained by loss
            self.register_buffer("choice_bias", torch.zeros(spec.num_experts, dtype=torch.float32))
        if m.shared_size:
            self.shared = mlp(m.shared_size)
            if m.gated_shared:
                self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.m = m
        self.has_shared = bool(m.shared_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top_k experts (N, k) and their weights (N, k), for x (N, hidden)."""
        m = self.m
        if m.fp32_router:
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        else:
            logits = self.router(x)
        if m.scoring == "sigmoid":
            scores = logits.float().sigmoid()
        else:
            scores = F.softmax(logits, dim=-1, dtype=torch.float)
        choice = scores + self.choice_bias if m.choice_bias else scores
        if m.groups > 1:  # only the experts of the top_groups best groups may be chosen
            grouped = choice.view(len(choice), m.groups, -1)  # (N, groups, E / groups)
            best = grouped.max(-1).values if m.group_score == "max" else grouped.topk(2, dim=-1)[0].sum(-1)
            kept = torch.zeros_like(best).scatter_(1, best.topk(m.top_groups, dim=-1)[1], 1.0).bool()
            out = ~kept.repeat_interleave(grouped.shape[-1], dim=1)  # (N, E)
            if m.scoring == "softmax":  # V2 zeroes the other groups' scores: weights too (a top_k
                scores = choice = scores.masked_fill(out, 0.0)  # beyond the kept experts weighs 0)
            else:  # V3 sets their biased scores to -inf, the choice only
                choice = choice.masked_fill(out, float("-inf"))
        chosen = torch.topk(choice, m.top_k, dim=-1)[1]
        weights = scores.gather(1, chosen)  # the unbiased scores of the chosen
        if m.norm_topk_prob:  # DeepSeek-V3 adds 1e-20 to the sum: no fp32 sum of scores moves by it
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if m.scale != 1.0:
            weights = weights * m.scale
        return chosen, weights if m.fp32_weights else weights.to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        x = x.reshape(-1, h)  # (N, hidden), N = B * T
        chosen, weights = self.route(x)
        out = torch.zeros_like(x)
        # The (token, slot) pairs sorted by expert, each expert's in token order: what
        # torch.where(chosen == e) gave expert by expert, found once for all experts.
        k = chosen.shape[1]
        order = chosen.flatten().argsort(stable=True)  # (N * k,) positions token * k + slot
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        token = order // k
        # index_select, not x[token]: the same rows, faster (bf16 most) on the CPU; bench_moe.py
        xs, ws = x.index_select(0, token), weights.flatten().index_select(0, order)[:, None]
        start = 0
        for e, n in enumerate(counts):  # in expert order, as transformers' loop adds them
            if n:
                end = start + n
                y = self.experts[e](xs[start:end]) * ws[start:end]
                out.index_add_(0, token[start:end], y.to(out.dtype))
                start = end
        if self.has_shared and self.m.gated_shared:
            out = out + F.sigmoid(self.shared_gate(x)) * self.shared(x)
        elif self.has_shared:
            out = out + self.shared(x)
        return out.view(b, t, h)
