"""Tiny random models of every family, with weights that depend only on (seed, name).

The shapes exercise the hard cases: GQA with 3 query heads per KV head (groups neither 1 nor
the head count), head_dim != hidden / heads, 2 layers, a vocabulary that is no multiple of 128.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

SHAPE: dict[str, Any] = {
    "vocab_size": 250,
    "hidden_size": 72,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 16,  # hidden / heads = 12
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

# model_type -> config fields on top of SHAPE. Every registered family needs a row.
TINY: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": False},
    "qwen2": {},
    "qwen3": {"attention_bias": True},
}


def tiny_config(model_type: str, *, tie: bool = False, **overrides: Any):
    """A transformers config of the family's tiny shape."""
    from transformers import AutoConfig

    fields = {**SHAPE, **TINY[model_type], "tie_word_embeddings": tie, **overrides}
    return AutoConfig.for_model(model_type, **fields)


def fill(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a generator seeded by (seed, its name): independent of
    transformers' init order. Norm weights centre on 1, everything else on 0; biases are
    nonzero so that a dropped bias cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            values = torch.randn(p.shape, generator=g, dtype=torch.float32)
            centre = 1.0 if "norm" in name and p.ndim == 1 else 0.0
            scale = 0.5 if p.ndim == 1 or "embed" in name else p.shape[-1] ** -0.5
            p.copy_(centre + scale * values)


def tiny_model(model_type: str, *, tie: bool = False, seed: int = 0, **overrides: Any):
    """A tiny fp32 model of the family, in eval mode, filled by `fill`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, tie=tie, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    fill(model, seed)
    return model.eval()


def save_tiny(model_type: str, path: Path, *, tie: bool = False, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny model as an HF directory (what `from_pretrained` and converters read)."""
    tiny_model(model_type, tie=tie, seed=seed, **overrides).save_pretrained(path)
    return path


def golden_input() -> torch.Tensor:
    """The fixed token ids every golden and equivalence check runs on: (2, 12)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, SHAPE["vocab_size"], (2, 12), generator=g)


def logits(model: torch.nn.Module, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits of a model on the golden input."""
    ids = golden_input() if input_ids is None else input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
