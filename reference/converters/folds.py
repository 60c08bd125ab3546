"""Folds: a scalar feature moved into the weights, for targets that lack it.

Each fold multiplies (or offsets) named canonical tensors, in fp32, then casts back. Folding
changes values, so a roundtrip through a fold is exact in its logits but not always bitwise;
`precision` says what each costs, and the tests measure it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reference.errors import ReferenceError
from reference.families.spec import DEFAULT_FEATURES, ModelSpec

if TYPE_CHECKING:  # imported where a fold is applied: `reference families` lists FOLDS only
    import torch

NORMS = ("layers.{}.attn_norm.weight", "layers.{}.mlp_norm.weight", "norm.weight",
         "layers.{}.attn.q_norm.weight", "layers.{}.attn.k_norm.weight",
         "layers.{}.attn_post_norm.weight", "layers.{}.mlp_post_norm.weight")


@dataclass(frozen=True)
class Fold:
    """`feature` at value v is the default plus tensors changed by `amount(spec, v)`:
    multiplied (op "mul") or offset (op "add")."""

    feature: str
    tensors: tuple[str, ...]
    op: str
    amount: Callable[[ModelSpec, Any], float]
    precision: str

    def names(self, spec: ModelSpec, have: set[str]) -> list[str]:
        """Canonical names this fold touches in a model of `spec` holding `have`."""
        layers = range(spec.num_layers)
        names = [t.format(i) for t in self.tensors for i in (layers if "{}" in t else [0])]
        return [n for n in dict.fromkeys(names) if n in have]

    def apply(self, x: torch.Tensor, spec: ModelSpec, value: Any, inverse: bool) -> torch.Tensor:
        """x with the feature folded in (inverse=False) or taken out again (inverse=True)."""
        if self.op == "normalize":
            return _normalize_rows(x, inverse)
        a = self.amount(spec, value)
        if self.op == "add":
            out = x.float() - a if inverse else x.float() + a
        else:
            import torch

            # The multiplier is rounded to the tensor's dtype first, as the families apply it.
            m = torch.tensor(a, dtype=torch.float32).to(x.dtype).float()
            out = x.float() / m if inverse else x.float() * m
        return out.to(x.dtype)


def _normalize_rows(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    # NormHead is one-way: the original row norms are gone. Going back, a model that will
    # normalise its head at run time computes the same only if the rows are unit length.
    if not inverse:
        import torch

        return torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype)
    norms = x.float().norm(dim=-1)
    worst = (norms - 1).abs().max().item() if norms.numel() else 0.0
    if worst > 1e-3:
        raise ReferenceError(f"lm_head rows must be unit length for a normalised head (off by {worst:.2g}); "
                             "NormHead is one-way")
    return x


def _attention(spec: ModelSpec, value: float | None) -> float:
    # Llama scales q.k by 1/sqrt(d); a model scaling by `value` has q multiplied by value*sqrt(d).
    return 1.0 if value is None else value * math.sqrt(spec.head_dim)


FOLDS: dict[str, Fold] = {f.feature: f for f in (
    Fold("norm_offset", NORMS, "add", lambda spec, v: 1.0 if v else 0.0,
         "w' = 1 + w in fp32: logits bitwise equal in fp32; in bf16 the norm multiply rounds "
         "once more; back, (1 + w) - 1 can differ from w in the last bit"),
    Fold("embedding_multiplier", ("embed.weight",), "mul", lambda spec, v: v,
         "E' = E * dtype(m): bitwise-equal embeddings in fp32 and bf16 (the product of two values "
         "of one dtype rounds once either way); the untied head keeps the original E"),
    Fold("attention_multiplier", ("layers.{}.attn.q.weight", "layers.{}.attn.q.bias"), "mul",
         _attention, "q times m * sqrt(head_dim): logits within fp32 rounding, not bitwise"),
    Fold("residual_multiplier", ("layers.{}.attn.o.weight", "layers.{}.attn.o.bias",
                                 "layers.{}.mlp.down.weight", "layers.{}.mlp.down.bias"), "mul",
         lambda spec, v: v, "o_proj and down_proj times r: logits within fp32 rounding"),
    Fold("logits_divisor", ("lm_head.weight",), "mul", lambda spec, v: 1.0 / v,
         "lm_head / s: logits within fp32 rounding"),
    Fold("normalized_head", ("lm_head.weight",), "normalize", lambda spec, v: 0.0,
         "lm_head rows normalised once in fp32: logits within fp32 rounding; one-way, the original "
         "row norms are not recoverable"),
)}

# Folds that change the embedding or the head need them as two tensors.
UNTIES = ("embedding_multiplier", "logits_divisor", "normalized_head")


def is_default(feature: str, value: Any) -> bool:
    return value == DEFAULT_FEATURES[feature]
