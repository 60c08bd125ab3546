"""Rotary position embeddings, chosen by the spec: every rope scaling type transformers knows
(its own initialisers compute the frequencies, so the numbers are the same by construction),
on the whole head or its first `rotary_fraction`, rotating halves or interleaved pairs, with
the windowed layers' own rope where the spec has one (`sliding_rope_parameters`).

transformers' "dynamic" and "longrope" types keep state across calls (frequencies grown for
the longest sequence seen so far), and so does Qwen v1's dynamic NTK (`long_context_scaling`:
the prompt's scaling is kept while generating). Here they are a function of the current call
alone: the result equals the original's on a fresh model, without a cache, for each input.
"""

from __future__ import annotations

import math

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from reference.families.spec import ModelSpec
from reference.modeling.config import UnifiedConfig

STATEFUL = ("dynamic", "longrope")  # frequencies depend on the sequence length
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, T, rotary_dim)


def rotary_dim(spec: ModelSpec) -> int:
    return int(spec.head_dim * spec.rotary_fraction)


def inverse_frequencies(config: UnifiedConfig,
                        seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq over the rotary dims, attention scaling of cos/sin) for a sequence of seq_len, a
    0-d tensor as transformers passes it: "dynamic" rounds its base differently from an int's."""
    spec = config.model_spec()
    kind = spec.rope_parameters.get("rope_type", "default")
    if kind == "default":
        dim = rotary_dim(spec)
        base = spec.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if kind not in ROPE_INIT_FUNCTIONS:
        from reference.errors import Inexpressible

        known = ", ".join(["default", *ROPE_INIT_FUNCTIONS])
        raise Inexpressible("unified", "rope_parameters",
                            f"rope type '{kind}' has no initialiser in transformers (known: {known})")
    if kind == "longrope":  # transformers picks the long factors past the original length only
        original = spec.rope_parameters.get("original_max_position_embeddings", spec.max_position_embeddings)
        long = (seq_len or 0) > original
        return ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=original + 1 if long else None)
    if kind == "dynamic" and (seq_len is None or seq_len <= spec.max_position_embeddings):
        seq_len = None  # transformers keeps the original frequencies up to the trained length
    return ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)


def ntk_alpha(length: int, trained: int) -> int:
    """Qwen v1's dynamic NTK factor for a sequence of `length`: 1 up to the trained length,
    then 2 ** ceil(log2(length / trained) + 1) - 1 (3 up to twice it, 7 up to four times...)."""
    return max(2 ** math.ceil(math.log(length / trained, 2) + 1) - 1, 1)


def ntk_frequencies(spec: ModelSpec, alphas: torch.Tensor) -> torch.Tensor:
    """(B, rotary_dim / 2) inverse frequencies of a plain rope whose base is raised by each
    row's NTK factor alpha: base * alpha ** (dim / (dim - 2))."""
    dim = rotary_dim(spec)
    exponents = torch.arange(0, dim, 2).float() / dim
    rows = [1.0 / ((spec.rope_parameters["rope_theta"] * a ** (dim / (dim - 2))) ** exponents)
            for a in alphas.tolist()]
    return torch.stack(rows)


class Rotary(torch.nn.Module):
    """cos and sin for given positions, for the full layers and for the windowed ones (the same
    unless the spec has `sliding_rope_parameters`); the frequencies are buffers, recomputed per
    call only for the sequence-length-dependent types."""

    def __init__(self, config: UnifiedConfig) -> None:
        super().__init__()
        spec = config.model_spec()
        self.spec, self.configs = spec, [config]
        if spec.sliding_rope_parameters is not None:
            windowed = UnifiedConfig.from_spec(
                spec.replace(rope_parameters=spec.sliding_rope_parameters, sliding_rope_parameters=None))
            self.configs.append(windowed)
        self.kinds = [c.model_spec().rope_parameters.get("rope_type", "default") for c in self.configs]
        computed = [inverse_frequencies(c) for c in self.configs]
        self.scalings = [scaling for _, scaling in computed]
        for i, (inv_freq, _) in enumerate(computed):
            self.register_buffer(f"inv_freq{i or ''}", inv_freq, persistent=False)

    def _frequencies(self, i: int, positions: torch.Tensor,
                     lengths: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(B or 1, 1, rotary_dim / 2) inverse frequencies of rope i, and its cos/sin scaling."""
        inv_freq, scaling = getattr(self, f"inv_freq{i or ''}"), self.scalings[i]
        if self.kinds[i] in STATEFUL:
            inv_freq, scaling = inverse_frequencies(self.configs[i], positions.max() + 1)
        trained = self.spec.long_context_scaling
        if lengths is not None and trained is not None and int(lengths.max()) > trained:
            alphas = torch.tensor([ntk_alpha(int(n), trained) for n in lengths.tolist()])
            return ntk_frequencies(self.spec, alphas).to(positions.device)[:, None], scaling
        return inv_freq.to(positions.device)[None, None], scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                lengths: torch.Tensor | None = None) -> list[Rope]:
        """[(cos, sin) of the full layers, (cos, sin) of the windowed ones]. `lengths` (B or 1):
        each row's sequence length so far, for the long-context scaling (None: none applied)."""
        out = []
        for i in range(len(self.configs)):
            inv_freq, scaling = self._frequencies(i, positions, lengths)
            with torch.autocast(device_type=positions.device.type, enabled=False):
                freqs = positions[..., None].float() * inv_freq.float()  # (B, T, rotary_dim / 2)
                if self.spec.interleaved_rope:  # frequency i on the pair (2i, 2i + 1)
                    emb = freqs.repeat_interleave(2, dim=-1)
                else:  # frequency i on dims i and i + rotary_dim / 2
                    emb = torch.cat((freqs, freqs), dim=-1)
                kept = torch.float32 if self.spec.fp32_rope else dtype  # apply_rotary casts back
                out.append(((emb.cos() * scaling).to(kept), (emb.sin() * scaling).to(kept)))
        return out if len(out) == 2 else out * 2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): each (even, odd) pair turned by 90 degrees."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head of x (B, H, T, D); the rest pass. With
    fp32 cos/sin (spec.fp32_rope) the rotation is computed in fp32 and cast back to x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rotary_dim)
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    turned = _rotate_pairs(rot) if interleaved else _rotate_half(rot)
    return torch.cat(((rot * cos + turned * sin).to(x.dtype), rest), dim=-1)
