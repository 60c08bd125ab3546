"""Folds: a scalar feature moved into the weights, for targets that lack it.

Each fold multiplies (or offsets) named canonical tensors, computed in float32. What is then
written depends on the precision asked for:
- `exact` (the default): a folded tensor keeps its dtype only where that dtype holds the
  float32 result exactly, else it is written in float32 (Gemma's bf16 norms become float32
  1 + w), so the converted model computes in float32 what the original computes in float32;
  unfolding narrows a tensor back to the model's dtype when nothing is lost by it, so
  gemma -> llama -> gemma is bitwise for every value float32 can offset exactly;
- `dtype`: every tensor keeps its dtype, rounding the fold.
What each fold cost is measured per tensor (the tensor folded back against the original) and
reported, never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reference.errors import InputError
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
        """Canonical names this fold touches in a model of `spec` holding `have` (a template's
        first `{}` numbers the layer, a second the expert)."""
        numbers = {0: [()], 1: [(i,) for i in range(spec.num_layers)],
                   2: [(i, e) for i in range(spec.num_layers) for e in range(spec.num_experts)]}
        names = [t.format(*n) for t in self.tensors for n in numbers[t.count("{}")]]
        return [n for n in dict.fromkeys(names) if n in have]

    def apply(self, x: torch.Tensor, spec: ModelSpec, value: Any, inverse: bool,
              like: torch.dtype | None = None) -> torch.Tensor:
        """x with the feature folded in (inverse=False) or taken out again (inverse=True),
        computed and returned in float32. A multiplier is first rounded to `like` (default x's
        dtype), the dtype the model is run in."""
        if self.op == "normalize":
            return _normalize_rows(x, inverse)
        a = self.amount(spec, value)
        if self.op == "add":
            return x.float() - a if inverse else x.float() + a
        import torch

        m = torch.tensor(a, dtype=torch.float32).to(like or x.dtype).float()
        return x.float() / m if inverse else x.float() * m


def _normalize_rows(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    # NormHead is one-way: the original row norms are gone. Going back, a model that will
    # normalise its head at run time computes the same only if the rows are unit length.
    if not inverse:
        import torch

        return torch.nn.functional.normalize(x.float(), dim=-1)
    norms = x.float().norm(dim=-1)
    worst = (norms - 1).abs().max().item() if norms.numel() else 0.0
    if worst > 1e-3:
        raise InputError(f"lm_head rows must be unit length for a normalised head (off by {worst:.2g}); "
                             "NormHead is one-way")
    return x.float()


def _attention(spec: ModelSpec, value: float | None) -> float:
    # Llama scales q.k by 1/sqrt(d); a model scaling by `value` has q multiplied by value*sqrt(d).
    return 1.0 if value is None else value * math.sqrt(spec.head_dim)


FOLDS: dict[str, Fold] = {f.feature: f for f in (
    Fold("norm_offset", NORMS, "add", lambda spec, v: 1.0 if v else 0.0,
         "w' = 1 + w in float32 (exact for |w| >= 2^-16 from bf16, 2^-13 from fp16)"),
    Fold("embedding_multiplier", ("embed.weight",), "mul", lambda spec, v: v,
         "E' = E * m, m rounded to the dtype the model runs in; the untied head keeps the original E"),
    Fold("attention_multiplier", ("layers.{}.attn.q.weight", "layers.{}.attn.q.bias"), "mul",
         _attention, "q times m * sqrt(head_dim): one float32 rounding per value"),
    # A mixture's output is its experts' (and shared expert's) down projections, weighted and summed.
    Fold("residual_multiplier", ("layers.{}.attn.o.weight", "layers.{}.attn.o.bias",
                                 "layers.{}.mlp.down.weight", "layers.{}.mlp.down.bias",
                                 "layers.{}.mlp.experts.{}.down.weight", "layers.{}.mlp.shared.down.weight"),
         "mul", lambda spec, v: v, "o_proj and down_proj times r: one float32 rounding per value"),
    Fold("logits_divisor", ("lm_head.weight",), "mul", lambda spec, v: 1.0 / v,
         "lm_head / s: one float32 rounding per value"),
    Fold("normalized_head", ("lm_head.weight",), "normalize", lambda spec, v: 0.0,
         "lm_head rows normalised once in float32; one-way, the original row norms are gone"),
)}

# Folds that change the embedding or the head need them as two tensors.
UNTIES = ("embedding_multiplier", "logits_divisor", "normalized_head")


def is_default(feature: str, value: Any) -> bool:
    return value == DEFAULT_FEATURES[feature]


PRECISIONS = ("exact", "dtype")


@dataclass(frozen=True)
class Refold:
    """One tensor's fold from one value of a feature (`have`) to another (`want`), in float32,
    multipliers rounded to `like` (the dtype the model is run in)."""

    fold: Fold
    spec: ModelSpec
    have: Any
    want: Any

    def forward(self, x: torch.Tensor, like: torch.dtype) -> torch.Tensor:
        if not is_default(self.fold.feature, self.have):
            x = self.fold.apply(x, self.spec, self.have, inverse=False, like=like)
        if not is_default(self.fold.feature, self.want):
            x = self.fold.apply(x, self.spec, self.want, inverse=True, like=like)
        return x.float()

    def back(self, y: torch.Tensor, like: torch.dtype) -> torch.Tensor:
        return Refold(self.fold, self.spec, self.want, self.have).forward(y, like)

    def unfolds(self) -> bool:
        """The source held the feature in its values and the target applies it again."""
        return is_default(self.fold.feature, self.have)


def written_dtype(refold: Refold, x: torch.Tensor, y: torch.Tensor, precision: str,
                  declared: torch.dtype | None, like: torch.dtype) -> torch.dtype:
    """The dtype a folded tensor x -> y (float32) is written in: see the module docstring."""
    import torch

    if precision == "dtype":
        return x.dtype
    if refold.unfolds() and declared is not None and declared != x.dtype:
        narrow = y.to(declared)
        if torch.equal(refold.back(narrow.float(), like).to(x.dtype), x):  # nothing lost
            return declared
    for d in (x.dtype, torch.float32):
        if torch.equal(y.to(d).float(), y):
            return d
    return max(x.dtype, torch.float32, key=lambda d: torch.finfo(d).bits)


@dataclass(frozen=True)
class FoldCost:
    """One folded tensor, measured: its dtype stored and written, and how many of its values
    do not come back bitwise when folded back (None: a one-way fold)."""

    tensor: str
    feature: str
    stored: str
    written: str
    values: int
    changed: int | None
    max_error: float | None
    grew_bytes: int


def measure(name: str, refold: Refold, x: torch.Tensor, out: torch.Tensor, like: torch.dtype) -> FoldCost:
    """Fold `out` back, round it to x's dtype and compare with x, value by value."""
    changed: int | None = None
    worst: float | None = None
    if refold.fold.op != "normalize":
        back = refold.back(out.float(), like).to(x.dtype)
        changed = int((back != x).sum())
        worst = float((back.float() - x.float()).abs().max()) if x.numel() else 0.0
    return FoldCost(name, refold.fold.feature, str(x.dtype).removeprefix("torch."),
                    str(out.dtype).removeprefix("torch."), x.numel(), changed, worst,
                    out.numel() * (out.element_size() - x.element_size()))
