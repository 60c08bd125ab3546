"""Attention kernels and masks. Masks are built once per forward from positions (causal,
sliding window, padding) and handed to the chosen backend; what the spec adds to the scores
is applied the same way in every backend that can serve it (a softcap: eager only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("eager", "sdpa")


def allowed(query_pos: torch.Tensor, key_pos: torch.Tensor, padding: torch.Tensor | None,
            window: int | None) -> torch.Tensor:
    """(B, 1, T, S) bool: may query t attend to key s. Positions index the cache (0..S-1);
    `padding` (B, S) is 1 where a key is a real token; a window keeps the last `window` keys."""
    q, k = query_pos[:, None], key_pos[None, :]  # (T, 1), (1, S)
    ok = k <= q
    if window is not None:
        ok = ok & (k > q - window)
    ok = ok[None, None]  # (1, 1, T, S)
    if padding is not None:
        ok = ok & padding[:, None, None, :].bool()
    return ok


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the additive one transformers uses (dtype's min where masked): a row with
    no allowed key (a padding query) then gets uniform weights rather than NaN."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV * groups, S, D): each KV head serves its group of query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def tanh_softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): x bounded to (-cap, cap), near the identity for small x."""
    return x if cap is None else torch.tanh(x / cap) * cap


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
          softcap: float | None = None, training: bool = False,
          dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, T, D), weights (B, H, T, S)); softmax in fp32, as transformers does. A
    softcap bounds the scores to (-cap, cap) by cap * tanh(scores / cap), before the mask."""
    scores = tanh_softcap(torch.matmul(q, k.transpose(2, 3)) * scale, softcap)
    scores = scores + mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
         softcap: float | None = None, training: bool = False,
         dropout: float = 0.0) -> tuple[torch.Tensor, None]:
    if softcap is not None:  # the model serves a softcap with eager (UnifiedForCausalLM._backend)
        raise ValueError("sdpa cannot apply an attention softcap; use the eager backend")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         dropout_p=dropout if training else 0.0)
    return out, None


SERVES_SOFTCAP = ("eager",)
KERNELS = {"eager": eager, "sdpa": sdpa}
