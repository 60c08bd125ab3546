"""The HF family of a Megatron-LM checkpoint (either format).

Megatron-LM's args describe a spec, not a family: Llama-shaped args fit Llama, Mistral, Phi-3,
InternLM2 and Granite alike, and each gives a different config.json. So the family is, in order:
our own record (hf_source.json, written beside every checkpoint we convert), the user's
`--family`, or the one family that expresses the spec exactly (else the one that holds it up
to biases, which `--add-bias-linear` adds and the conversion drops when zero). Several such
families are refused, naming them, rather than one picked by registry order.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from reference.converters.megatron.write import FAMILY_FILE
from reference.errors import InputError
from reference.families.family import Family
from reference.families.registry import FAMILIES, family_named
from reference.families.spec import BIAS_KEYS, FEATURES, ModelSpec
from reference.families.verdict import blocking


def routing_dtype(spec: ModelSpec, family: Family) -> ModelSpec:
    """The spec with the family's dtype of routing weights and of latent attention's rope, and its
    group score where there are no groups:
    megatron-core's args have no such setting (its probabilities take the router's dtype, its
    rope the model's), and in fp32 both compute the same."""
    if spec.mla is not None:
        spec = spec.replace(fp32_rope=family.express(spec).fp32_rope)
    if spec.moe is None:
        return spec
    held = family.express(spec).moe
    if held is None:
        return spec
    # without groups the group score computes nothing: the family's (DeepSeek-V3's "top2")
    score = held.group_score if spec.moe.groups == 1 else spec.moe.group_score
    return spec.replace(moe=replace(spec.moe, fp32_weights=held.fp32_weights, group_score=score))

# A family is matched against the args' spec as it would read them (routing_dtype): a megatron-core
# save of DeepSeek-V3 records no fp32 routing weights and, without groups, no group score.
def _exact(family: Family, spec: ModelSpec) -> bool:
    spec = routing_dtype(spec, family)
    expressed = family.express(spec)
    return all(getattr(expressed, x) == getattr(spec, x) for x in FEATURES)


def _holds(family: Family, spec: ModelSpec) -> bool:
    spec = routing_dtype(spec, family)
    return set(blocking(spec, family.express(spec))) <= set(BIAS_KEYS)


def candidates(spec: ModelSpec) -> list[str]:
    """The families (with a key map) that express the spec exactly, else up to biases."""
    rows = [f for f in FAMILIES.values() if f.keys is not None]
    return [f.model_type for f in rows if _exact(f, spec)] or [f.model_type for f in rows if _holds(f, spec)]


def megatron_family(root: Path, spec: ModelSpec, given: str | None, where: str,
                    any_fit: bool = False) -> tuple[Family, dict[str, Any]]:
    """(family, recorded config fields) of the checkpoint at `root` whose args (in `where`) give
    `spec`; `given` is `--family`; `any_fit` takes the first family that fits (for callers that
    use the spec only: verify, the unified model). Each failure is one line naming the file or
    the families."""
    record = root / FAMILY_FILE
    if record.is_file():
        try:
            data = json.loads(record.read_text())
            family, config = family_named(data["model_type"]), dict(data.get("config") or {})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{record}: corrupt (want model_type and config)") from None
        if given is not None and given != family.model_type:
            raise InputError(f"--family {given}: {record} records {family.model_type}")
        return family, config
    if given is not None:
        family = family_named(given)
        if family.keys is None:
            raise InputError(f"--family {given}: its tensor layout is not mapped yet")
        if not _holds(family, spec):
            read = routing_dtype(spec, family)
            feature = [f for f in blocking(read, family.express(read)) if f not in BIAS_KEYS][0]
            raise InputError(f"--family {given}: the args in {where} have {feature}="
                             f"{getattr(read, feature)!r}, which {given} does not express")
        return family, {}
    found = candidates(spec)
    if not found:
        raise InputError(f"{where}: no family expresses these args; pass --family NAME")
    if len(found) > 1 and not any_fit:
        raise InputError(f"{where}: the args fit several families ({', '.join(found)}) and there is no "
                         f"{FAMILY_FILE}; pass --family NAME")
    return family_named(found[0]), {}
