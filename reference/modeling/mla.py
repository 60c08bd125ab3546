"""Multi-head latent attention (DeepSeek-V2/3, spec.mla), computed as transformers' classes do.

    q = q(x)  or  q_b(q_a_norm(q_a(x)))                     # (B, T, H * (nope + rope))
    latent, k_rope = split(kv_a(x), [kv_rank, rope])        # one rope key every head shares
    k_nope, v = split(kv_b(kv_a_norm(latent)), [nope, v])   # per head
    q = cat(q_nope, rope(q_rope));  k = cat(k_nope, rope(k_rope))
    out = o(attention(q, k, v) * scale)                     # scale: (nope + rope) ** -0.5, times
                                                            # YaRN's mscale ** 2 (mscale_all_dim)

Rope acts on the rope parts only (interleaved pairs in DeepSeek's checkpoints; V3's
`rope_interleave` False rotates halves). transformers returns the interleaved pairs
de-interleaved, on q and k alike: the same q.k. The KV cache holds each head's full key and
value (transformers caches the latent and expands it per step: the same numbers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import yarn_apply_mscale

from reference.families.spec import ModelSpec, linear_shapes
from reference.modeling import attention
from reference.modeling.rope import apply_rotary


def softmax_scale(spec: ModelSpec) -> float:
    """The q.k scale: a whole head's (nope + rope) ** -0.5, times mscale ** 2 where a scaled rope
    (YaRN) has mscale_all_dim, as DeepSeek's reference and transformers' yarn_apply_mscale do."""
    assert spec.mla is not None
    return yarn_apply_mscale(spec.rope_parameters, (spec.mla.nope_dim + spec.head_dim) ** -0.5)


class LatentAttention(nn.Module):
    """MLA with canonical names: q (or q_a, q_a_norm, q_b), kv_a, kv_a_norm, kv_b, o. `norm(size,
    eps)` makes the latent norms (the model's RMSNorm)."""

    def __init__(self, spec: ModelSpec, layer: int, norm: Callable[[int, float], nn.Module]) -> None:
        super().__init__()
        m = spec.mla
        if m is None or spec.num_kv_heads != spec.num_heads or spec.qkv_bias or spec.o_bias or spec.qk_norm:
            raise ValueError("latent attention needs its dimensions (spec.mla), a KV head per query head, "
                             "and no bias or q/k norm")
        rows = linear_shapes(spec)

        def linear(name: str) -> nn.Linear:
            out, into = rows[name]
            return nn.Linear(into, out, bias=False)

        if m.q_rank is None:
            self.q = linear("q")
        else:
            self.q_a, self.q_a_norm, self.q_b = linear("q_a"), norm(m.q_rank, m.norm_eps), linear("q_b")
        self.kv_a, self.kv_a_norm, self.kv_b = linear("kv_a"), norm(m.kv_rank, m.norm_eps), linear("kv_b")
        self.o = linear("o")
        self.heads, self.rope, self.nope, self.v_dim, self.rank = (
            spec.num_heads, spec.head_dim, m.nope_dim, m.v_dim, m.kv_rank)
        self.low_rank_q, self.interleaved, self.layer = m.q_rank is not None, spec.interleaved_rope, layer
        self.scale = softmax_scale(spec)
        self.kernel = attention.Kernel()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: Cache | None, backend: str) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_b(self.q_a_norm(self.q_a(x))) if self.low_rank_q else self.q(x)
        q = q.view(b, t, self.heads, -1).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a(x).split([self.rank, self.rope], dim=-1)  # (B, T, rank), (B, T, rope)
        kv = self.kv_b(self.kv_a_norm(latent)).view(b, t, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, T, nope), (B, H, T, v)
        q_rope = apply_rotary(q_rope, *rope, self.interleaved)
        k_rope = apply_rotary(k_rope[:, None], *rope, self.interleaved)  # (B, 1, T, rope): one for all heads
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.heads, -1, -1)), dim=-1)  # (B, H, T, nope + rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # (B, H, S, .), S = past + T
        out, _ = self.kernel(backend, q, k, v, mask, self.scale, None)  # (B, H, T, v)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))
