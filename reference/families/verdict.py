"""What a target can do with a model: exact, exact with folding or under a condition, or
refused (naming why)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Protocol

from reference.families.family import Family
from reference.families.spec import BIAS_KEYS, DEFAULT_FEATURES, FEATURES, FOLDABLE, ModelSpec

# Features of ModelSpec the unified model does not compute yet: refused by name until it does.
UNIFIED_NOT_BUILT: tuple[str, ...] = ()


def unified_holds(feature: str) -> bool:
    """Whether the unified model computes a feature (so a refusal elsewhere can point to it)."""
    return feature not in UNIFIED_NOT_BUILT


class Unified:
    """What the unified model holds of a spec: everything it computes, exactly."""

    name = "unified"

    def express(self, spec: ModelSpec) -> ModelSpec:
        held = spec.replace(**{f: DEFAULT_FEATURES[f] for f in UNIFIED_NOT_BUILT})
        # experts routed in a way the spec does not describe: no mixture it computes
        return held.replace(num_experts=0) if spec.num_experts and spec.moe is None else held

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        return {}


# A 7B shape; the vocabulary is large enough for every class's default token ids (no warnings).
# No norm eps: each class's own default stands, as in the family's real configs. One eps for
# every family would describe models none publishes (DeepSeek's latent norms are fixed at 1e-6,
# so a 1e-5 model eps would make megatron-core, one layernorm_epsilon for every norm, refuse it).
_DIMS = {"vocab_size": 262144, "hidden_size": 4096, "intermediate_size": 11008,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
         "head_dim": 128, "max_position_embeddings": 32768}


class Holder(Protocol):
    """What can hold a model: an HF family, the unified model, Megatron. A conversion target
    (reference/converters/conversion.py `Target`) is a Holder that also writes."""

    @property
    def name(self) -> str: ...

    def express(self, spec: ModelSpec) -> ModelSpec:
        """The spec as this holder holds it: every feature it cannot hold at Llama's value."""
        ...

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        """Dimensions (an activation, a rope type) it cannot hold, each with why."""
        ...


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


# What each family's transformers config class makes of the config above, stored: the classes
# import torch and transformers (seconds, nearly all of `reference families`). Written by
# `nox -s goldens` from the installed transformers and checked against it by the tests; a
# family not in it yet is asked live.
CLASS_DEFAULTS = Path(__file__).with_name("class_defaults.json")


def typical_config(model_type: str) -> dict[str, Any]:
    """A 7B-shaped config of the family as its transformers config class fills it in (as
    written for a layout with no class in transformers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from reference.families.config import LLAMA_FIELDS
    from reference.families.registry import family_named
    from reference.families.resolve import as_loaded

    own: dict[str, Any] = {}
    if model_type not in CONFIG_MAPPING:  # no class to fill them in: the family's own names too
        fields = family_named(model_type).fields
        own = {fields[c]: _DIMS[hf] for c, hf in LLAMA_FIELDS.items() if hf in _DIMS and c in fields}
    return as_loaded({**own, **_DIMS, "model_type": model_type}, model_type)


@functools.cache
def class_defaults() -> dict[str, dict[str, Any]]:
    """`typical_config` of every family, as CLASS_DEFAULTS stores it."""
    return json.loads(CLASS_DEFAULTS.read_text())["configs"]


def typical(family: Family) -> ModelSpec:
    """The spec of a 7B-shaped config of the family with every optional field at its default
    (its config class's, where transformers has one)."""
    cfg = class_defaults().get(family.model_type) or typical_config(family.model_type)
    return family.read(cfg, family.model_type)


def _refused(spec: ModelSpec, target: Holder) -> list[str]:
    """Features and dimensions (an activation, a rope type) of `spec` the target cannot hold."""
    return blocking(spec, target.express(spec)) + list(target.refuses(spec))


def verdict(source: Family, target: Holder) -> str:
    """One cell of `reference families`: how the features `source` may hold fare in `target`.

    A switch the family's config class turns on by default (Mistral's window) makes a
    condition, not a refusal of the family."""
    base = typical(source)
    switches = {f for codec in source.codecs for f in codec.switches()}
    optional = [f for f in _refused(base, target) if f in switches]
    needs = [f for f in _refused(base, target) if f not in optional and f not in BIAS_KEYS]
    if needs:
        return "refused: " + ", ".join(needs + optional)
    zero_if = [f for f in _refused(base, target) if f in BIAS_KEYS]  # only the tensors can tell
    base = base.replace(**{f: DEFAULT_FEATURES[f] for f in optional})
    folds = [f for f in FOLDABLE if getattr(base, f) != getattr(target.express(base), f)]
    refused_if: list[str] = list(optional)
    for codec in source.codecs:
        for variant in codec.variants():
            spec = base.replace(**variant)
            held = target.express(spec)
            for f in _refused(spec, target):
                (zero_if if f in BIAS_KEYS else refused_if).append(f)
            folds += [f for f in FOLDABLE if getattr(spec, f) != getattr(held, f)]
    text = "exact with folding (" + ", ".join(dict.fromkeys(folds)) + ")" if folds else "exact"
    if zero_if:
        text += " if " + " and ".join(f"{b} is zero" for b in dict.fromkeys(zero_if))
    if refused_if:
        text += "; refused if it uses " + ", ".join(dict.fromkeys(refused_if))
    return text
