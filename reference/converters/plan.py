"""Source tensors -> canonical tensors -> target tensors, lazily: names and shapes first,
data only when the writer pulls it. Every source tensor is consumed exactly once and every
target tensor produced exactly once, or the plan raises naming the key."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from reference.converters.safetensors_io import Entry, Planned
from reference.errors import Inexpressible, ReferenceError
from reference.families.family import Family
from reference.families.spec import BIAS_KEYS, FEATURES, ModelSpec, bias_shape, canonical_names


@dataclass(frozen=True)
class Lazy:
    """A tensor not yet read: its data-free stand-in and how to get it."""

    meta: torch.Tensor
    load: Callable[[], torch.Tensor | Entry]


def materialize(x: torch.Tensor | Entry) -> torch.Tensor:
    """A tensor, reading it if it is still a byte range."""
    return x.load() if isinstance(x, Entry) else x


def read_canonical(
    entries: Mapping[str, Entry], family: Family, spec: ModelSpec, where: str
) -> dict[str, Lazy]:
    """The canonical tensors of a checkpoint, checked against what its spec must hold."""
    out: dict[str, Lazy] = {}
    for key, entry in entries.items():
        name = family.keys.canonical(key, where)
        if name is None or (name == "lm_head.weight" and spec.tie_word_embeddings):
            continue  # a tied head is the embedding; transformers ignores a saved copy too
        out[name] = Lazy(entry.meta(), lambda e=entry: e)
    expected = list(canonical_names(spec))
    for name in expected:
        if name not in out:
            raise ReferenceError(f"{where}: missing tensor '{family.keys.hf(name, family.model_type)}'")
    extra = sorted(set(out) - set(expected))
    if extra:
        hf = family.keys.hf(extra[0], family.model_type)
        raise ReferenceError(f"{where}: tensor '{hf}' does not fit config.json (unexpected)")
    return {name: out[name] for name in expected}


def _bias_names(spec: ModelSpec, feature: str) -> list[str]:
    return [t.format(i) for i in range(spec.num_layers) for t in BIAS_KEYS[feature]]


def prune_zero_biases(tensors: dict[str, Lazy], spec: ModelSpec) -> tuple[dict[str, Lazy], ModelSpec]:
    """Drop every bias feature whose tensors are all zero: a zero bias computes nothing, and
    dropping it lets llama -> qwen2 -> llama (which adds zero q, k, v biases) return bitwise."""
    for feature in BIAS_KEYS:
        names = _bias_names(spec, feature) if getattr(spec, feature) else []
        if names and not any(torch.count_nonzero(materialize(tensors[n].load())) for n in names):
            tensors = {k: v for k, v in tensors.items() if k not in names}
            spec = spec.replace(**{feature: False})
    return tensors, spec


def adapt(
    tensors: dict[str, Lazy],
    spec: ModelSpec,
    held: ModelSpec,
    key_of: Callable[[str], str],
    target: str,
    allow: Collection[str] = (),
) -> tuple[dict[str, Lazy], list[str]]:
    """Canonical tensors of `spec` re-laid for `held` (what the target holds): biases the
    target always has are filled with zeros. Returns the tensors and the caveats accepted
    by `allow`; any other difference raises, naming the feature."""
    tensors = dict(tensors)
    caveats: list[str] = []
    for feature in FEATURES:
        have, want = getattr(spec, feature), getattr(held, feature)
        if have == want:
            continue
        if feature in BIAS_KEYS and want:  # a zero bias computes the same as none
            for name in _bias_names(spec, feature):
                like = tensors[name.replace("bias", "weight")].meta
                zero = torch.zeros(bias_shape(spec, name), dtype=like.dtype)
                tensors[name] = Lazy(zero.to("meta"), lambda z=zero: z)
        elif feature in BIAS_KEYS:  # after prune_zero_biases, some tensor is nonzero
            name = next(n for n in _bias_names(spec, feature)
                        if torch.count_nonzero(materialize(tensors[n].load())))
            detail = f"'{key_of(name)}' is nonzero"
            raise Inexpressible(target, feature, detail)
        elif feature in allow:
            caveats.append(f"dropped {feature}={have!r}: {target} computes without it")
        else:
            raise Inexpressible(target, feature, f"the model has {feature}={have!r}")
    return tensors, caveats


def plan_target(
    tensors: Mapping[str, Lazy], family: Family, held: ModelSpec, dtype: torch.dtype | None
) -> list[Planned]:
    """The target's tensors in its canonical order, each cast to `dtype` if one is given."""
    planned = []
    for name in canonical_names(held):
        lazy = tensors[name]
        out_dtype = dtype if dtype is not None and lazy.meta.is_floating_point() else lazy.meta.dtype
        if out_dtype == lazy.meta.dtype:
            produce = lazy.load
        else:
            produce = lambda lazy=lazy, d=out_dtype: materialize(lazy.load()).to(d)  # noqa: E731
        planned.append(Planned(family.keys.hf(name, family.model_type), out_dtype,
                               tuple(lazy.meta.shape), produce))
    return planned
