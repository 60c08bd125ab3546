"""Rotary position embeddings, chosen by the spec: every rope scaling type transformers knows
(its own initialisers compute the frequencies, so the numbers are the same by construction),
on the whole head or its first `rotary_fraction`, rotating halves or interleaved pairs.

transformers' "dynamic" and "longrope" types keep state across calls (frequencies grown for
the longest sequence seen so far). Here they are a function of the current call alone: the
result equals transformers' on a fresh model for each input.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from reference.families.spec import ModelSpec
from reference.modeling.config import UnifiedConfig

STATEFUL = ("dynamic", "longrope")  # frequencies depend on the sequence length


def rotary_dim(spec: ModelSpec) -> int:
    return int(spec.head_dim * spec.rotary_fraction)


def inverse_frequencies(config: UnifiedConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq over the rotary dims, attention scaling of cos/sin) for a sequence of seq_len."""
    spec = config.model_spec()
    kind = spec.rope_parameters.get("rope_type", "default")
    if kind == "default":
        dim = rotary_dim(spec)
        base = spec.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        from reference.errors import Inexpressible

        raise Inexpressible("unified", "rope_parameters", f"rope type '{kind}' is not known to transformers")
    if kind == "longrope":  # transformers picks the long factors past the original length only
        original = spec.rope_parameters.get("original_max_position_embeddings", spec.max_position_embeddings)
        long = (seq_len or 0) > original
        return ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=original + 1 if long else None)
    if kind == "dynamic" and (seq_len is None or seq_len <= spec.max_position_embeddings):
        seq_len = None  # transformers keeps the original frequencies up to the trained length
    return ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)


class Rotary(torch.nn.Module):
    """cos and sin for given positions; the frequencies are a buffer, recomputed per call only
    for the sequence-length-dependent types."""

    def __init__(self, config: UnifiedConfig) -> None:
        super().__init__()
        self.config = config
        self.kind = config.model_spec().rope_parameters.get("rope_type", "default")
        self.interleaved = config.model_spec().interleaved_rope
        inv_freq, self.scaling = inverse_frequencies(config)
        self.inv_freq = torch.nn.Buffer(inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.inv_freq, self.scaling
        if self.kind in STATEFUL:
            inv_freq, scaling = inverse_frequencies(self.config, int(positions.max()) + 1)
            inv_freq = inv_freq.to(positions.device)
        with torch.autocast(device_type=positions.device.type, enabled=False):
            freqs = positions[..., None].float() * inv_freq.float()  # (B, T, rotary_dim / 2)
            # each frequency on a half's pair (i, i + n/2), or on an adjacent pair (2i, 2i + 1)
            pairs = freqs.repeat_interleave(2, dim=-1) if self.interleaved else None
            emb = torch.cat((freqs, freqs), dim=-1) if pairs is None else pairs
            return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head of x (B, H, T, D); the rest pass.
    `interleaved` rotates adjacent pairs (Cohere) instead of halves."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rotary_dim)
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    turned = _rotate_pairs(rot) if interleaved else _rotate_half(rot)
    return torch.cat((rot * cos + turned * sin, rest), dim=-1)
