"""What a target can do with a model: exact, exact with folding or under a condition, or
refused (naming why)."""

from __future__ import annotations

from typing import Protocol

from reference.families.family import Family
from reference.families.spec import BIAS_KEYS, FEATURES, FOLDABLE, ModelSpec

_DIMS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5}


class Holder(Protocol):
    def express(self, spec: ModelSpec) -> ModelSpec: ...


def blocking(spec: ModelSpec, held: ModelSpec) -> list[str]:
    """Features on which `held` (what a target holds) differs from `spec` in a way no weight can
    absorb. A bias the target adds is filled with zeros and a foldable scalar moves into the
    weights, so neither blocks; a bias the target lacks blocks unless it is zero, which only
    the tensors can tell."""
    return [
        f for f in FEATURES
        if getattr(spec, f) != getattr(held, f)
        and f not in FOLDABLE and not (f in BIAS_KEYS and getattr(held, f))
    ]


def typical(family: Family) -> ModelSpec:
    """The spec of a 7B-shaped config of the family with every optional field at its default."""
    return family.read({**_DIMS, "model_type": family.model_type}, family.model_type)


def verdict(source: Family, target: Holder) -> str:
    """One cell of `reference families`: how the features `source` may hold fare in `target`."""
    base = typical(source)
    needs = blocking(base, target.express(base))
    if needs:
        return "refused: " + ", ".join(needs)
    folds = [f for f in FOLDABLE if getattr(base, f) != getattr(target.express(base), f)]
    refused_if: list[str] = []
    zero_if: list[str] = []
    for codec in source.codecs:
        for variant in codec.variants():
            spec = base.replace(**variant)
            held = target.express(spec)
            for f in blocking(spec, held):
                (zero_if if f in BIAS_KEYS else refused_if).append(f)
            folds += [f for f in FOLDABLE if getattr(spec, f) != getattr(held, f)]
    text = "exact with folding (" + ", ".join(dict.fromkeys(folds)) + ")" if folds else "exact"
    if zero_if:
        text += " if " + " and ".join(f"{b} is zero" for b in dict.fromkeys(zero_if))
    if refused_if:
        text += "; refused if it uses " + ", ".join(dict.fromkeys(refused_if))
    return text
