"""What a target can do with a model: exact, exact under a condition, or refused (why)."""

from __future__ import annotations

from reference.families.family import Family
from reference.families.spec import BIAS_KEYS, FEATURES, ModelSpec

_PROBE = ModelSpec(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, max_position_embeddings=32768, norm_eps=1e-5, hidden_act="silu",
)


def blocking(spec: ModelSpec, held: ModelSpec) -> list[str]:
    """Features on which `held` (what a target holds) differs from `spec` in a way that changes
    the computation. A bias the target adds is filled with zeros, so it never blocks; a bias the
    target lacks blocks unless it is zero, which only the tensors can tell."""
    return [
        f for f in FEATURES
        if getattr(spec, f) != getattr(held, f) and not (f in BIAS_KEYS and getattr(held, f))
    ]


def verdict(source: Family, target: Family) -> str:
    """One cell of `reference families`: how the features `source` may hold fare in `target`."""
    base = source.express(_PROBE)
    needs = [f for f in blocking(base, target.express(base)) if f not in BIAS_KEYS]
    conditions: list[str] = []
    for codec in source.codecs:
        for variant in codec.variants():
            spec = base.replace(**variant)
            for f in blocking(spec, target.express(spec)):
                if f not in needs:
                    conditions.append(f)
    if needs:
        return "refused: " + ", ".join(needs)
    biases = [f for f in dict.fromkeys(conditions) if f in BIAS_KEYS]
    others = [f for f in dict.fromkeys(conditions) if f not in BIAS_KEYS]
    parts = []
    if others:
        parts.append("refused if it uses " + ", ".join(others))
    if biases:
        parts.append("exact if " + " and ".join(f"{b} is zero" for b in biases))
    return "; ".join(parts) or "exact"
