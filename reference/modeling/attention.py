"""Attention kernels and masks. Masks are built once per forward from positions (causal,
sliding window, padding, ALiBi's per-head bias) and handed to the chosen backend; what the
spec adds to the scores is applied the same way in every backend that can serve it (a softcap:
eager only; ALiBi: every backend, as an additive mask)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's slope of each head (Press et al., as Baichuan2-13B and BLOOM compute them): for n
    a power of two, the geometric sequence start, start ** 2, ... with start = 2 ** (-8 / n);
    otherwise those of the power of two below n, then every other slope of the one above."""
    if math.log2(heads).is_integer():
        start = 2 ** (-(2 ** -(math.log2(heads) - 3)))
        return [start * start**i for i in range(heads)]
    below = 2 ** math.floor(math.log2(heads))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][: heads - below]


def alibi(heads: int, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """(1, H, T, S) fp32: ALiBi's bias, slope times the distance (key - query, <= 0 for the keys
    a query may attend to). Baichuan adds slope * key; softmax cancels the per-query difference."""
    slopes = torch.tensor(alibi_slopes(heads), device=query_pos.device)
    return (slopes[:, None, None] * (key_pos[None, None, :] - query_pos[None, :, None]))[None]


def log_n(trained: int, start: int, end: int, device: torch.device) -> torch.Tensor:
    """(T, 1): Qwen v1's log-n attention factor of the queries at cache positions start..end-1:
    log(p + 1) / log(trained) for position p beyond the trained length, 1 within it."""
    scale = [math.log(p + 1, trained) if p + 1 > trained else 1.0 for p in range(start, end)]
    return torch.tensor(scale, device=device)[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV * groups, S, D): each KV head serves its group of query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal(t: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive mask of plain causal attention of t queries over the last t of s keys."""
    keys = torch.arange(s, device=device)
    return additive(allowed(keys[s - t:], keys, None, None), dtype)


def tanh_softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): x bounded to (-cap, cap), near the identity for small x."""
    return x if cap is None else torch.tanh(x / cap) * cap


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          softcap: float | None = None, training: bool = False,
          dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, T, D), weights (B, H, T, S)); softmax in fp32, as transformers does. A
    softcap bounds the scores to (-cap, cap) by cap * tanh(scores / cap), before the mask.
    `mask` None is plain causal attention."""
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    if mask is None:
        mask = causal(q.shape[2], k.shape[2], q.dtype, q.device)
    scores = tanh_softcap(torch.matmul(q, k.transpose(2, 3)) * scale, softcap)
    scores = scores + mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
         softcap: float | None = None, training: bool = False,
         dropout: float = 0.0) -> tuple[torch.Tensor, None]:
    """torch's fused kernel; plain causal attention (mask None) takes its is_causal path, with no
    mask tensor at all. KV heads are shared without copies where the kernel is fast at it:
    with no mask, by the kernel; for one query per head (decoding), by packing each group's
    queries as rows over their KV head; with a mask, they are repeated (the kernel's shared-KV
    path is several times slower on the CPU then)."""
    if softcap is not None:  # the model serves a softcap with eager (UnifiedForCausalLM._backend)
        raise ValueError("sdpa cannot apply an attention softcap; use the eager backend")
    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    groups, drop = h // kv, dropout if training else 0.0
    if mask is None and t not in (1, s):  # a chunk after a cache: is_causal would align it wrongly
        mask = causal(t, s, q.dtype, q.device)
    if groups > 1 and t == 1:
        if mask is not None and mask.shape[1] != 1:  # per-head (ALiBi): rows follow the queries
            mask = mask.reshape(b, kv, groups, s)
        out = F.scaled_dot_product_attention(q.reshape(b, kv, groups, d), k, v, attn_mask=mask, scale=scale,
                                             dropout_p=drop)
        return out.reshape(b, h, 1, d), None
    if groups > 1 and mask is not None:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         is_causal=mask is None and t > 1, dropout_p=drop,
                                         enable_gqa=k.shape[1] != h)
    return out, None


SERVES_SOFTCAP = ("eager",)
KERNELS = {"eager": eager, "sdpa": sdpa}


class Kernel(nn.Module):
    """The chosen kernel as a module (no parameters), so that a forward hook sees exactly what
    it computes from: reference.modeling.probes records q, k and the mask there."""

    def forward(self, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, scale: float,
                softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return KERNELS[backend](q, k, v, mask, scale, softcap)
