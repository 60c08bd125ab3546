"""Source tensors -> canonical tensors -> target tensors, lazily: names and shapes first,
data only when the writer pulls it. Every source tensor is consumed exactly once and every
target tensor produced exactly once, or the plan raises naming the key."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

import torch

from reference.converters.folds import FOLDS, UNTIES, FoldCost, Refold, is_default, measure, written_dtype
from reference.converters.fp8 import Dequantized
from reference.converters.safetensors_io import Entry, Planned
from reference.errors import Inexpressible, InputError
from reference.families.family import Family
from reference.families.keymap import Computed, ExpertStack, Fused, Stacked
from reference.families.spec import (
    BIAS_KEYS,
    FEATURES,
    ModelSpec,
    bias_shape,
    canonical_names,
    canonical_shapes,
)
from reference.families.verdict import unified_holds


@dataclass(frozen=True)
class Lazy:
    """A tensor not yet read: its data-free stand-in and how to read it. When the tensor is a
    source file's bytes unchanged, `entry` says where they lie, so a writer can copy them
    byte for byte instead of calling `load`; when it is row blocks of other tensors (a Megatron
    tensor's TP pieces), `rows` gives them, so a writer that streams bytes writes them one after
    another instead of concatenating them first (`load`)."""

    meta: torch.Tensor
    load: Callable[[], torch.Tensor]
    entry: Entry | None = None
    rows: Callable[[], list[torch.Tensor]] | None = None


# A sequence-classification checkpoint (`<Family>ForSequenceClassification`, num_labels=1): the
# causal LM's trunk keys under the same base prefix, no lm_head, and this scalar value head.
SCORE = "score.weight"


def sequence_classifier(model_type: str) -> str | None:
    """transformers' sequence-classification class of a family, if it has one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)


def expected_names(spec: ModelSpec, score: bool) -> list[str]:
    """The tensors a checkpoint of `spec` holds: canonical_names, or with a score head the
    trunk's (no lm_head, nor its bias) and `score.weight` last."""
    names = list(canonical_names(spec))
    return [n for n in names if not n.startswith("lm_head.")] + [SCORE] if score else names


def check_score(meta: torch.Tensor, spec: ModelSpec, where: str) -> None:
    """A score head is a scalar one: (1, hidden)."""
    if tuple(meta.shape) != (1, spec.hidden_size):
        raise InputError(f"{where}: '{SCORE}' has shape {tuple(meta.shape)}, not (1, {spec.hidden_size}): "
                         "only a scalar head (num_labels=1) is held")


def refuse_score(model_type: str, where: str) -> None:
    """A family transformers has no sequence-classification class for holds no score head."""
    if sequence_classifier(model_type) is None:
        raise InputError(f"{where}: {model_type} has no sequence-classification class in transformers, "
                         f"so its checkpoints hold no '{SCORE}' (a reward model of it can only be "
                         "kept in the unified format)")


def read_canonical(
    entries: Mapping[str, Entry | Dequantized], family: Family, spec: ModelSpec, where: str
) -> dict[str, Lazy]:
    """The canonical tensors of a checkpoint, checked against what its spec must hold; a
    sequence-classification checkpoint's `score.weight` is taken as it is, in place of lm_head."""
    out: dict[str, Lazy] = {}
    score = entries.get(SCORE)
    if score is not None:
        refuse_score(family.model_type, where)
        check_score(score.meta(), spec, where)
        entries = {k: v for k, v in entries.items() if k != SCORE}
    stacks: dict[str, dict[int, Entry]] = {}
    for key, entry in entries.items():
        names, fused = family.keys.canonical(key, where)
        if isinstance(fused, Stacked):
            stacks.setdefault(names[0], {})[family.keys.row(key)] = entry
            continue
        if isinstance(fused, Computed):
            _check_computed(key, entry, fused, spec, where)
            continue
        if isinstance(fused, ExpertStack):
            out.update(_experts(key, entry, names, fused, spec, where))
            continue
        if fused is None:
            stored = entry if isinstance(entry, Entry) else None  # a dequantized weight is computed
            for name in names:
                out[name] = Lazy(entry.meta(), entry.load, stored)
            continue
        metas = fused.split(entry.meta(), spec)
        for i, name in enumerate(names):
            out[name] = Lazy(metas[i], lambda e=entry, i=i, f=fused: f.split(e.load(), spec)[i])
    for name, rows in stacks.items():
        if sorted(rows) != list(range(len(rows))):
            raise InputError(f"{where}: the rows of '{family.keys.hf(name, family.model_type)[0]}' "
                                 f"are numbered {sorted(rows)}, not 0..{len(rows) - 1}")
        stacked = [rows[i] for i in range(len(rows))]
        out[name] = Lazy(torch.stack([e.meta() for e in stacked]),
                         lambda es=stacked: torch.stack([e.load() for e in es]))
    if spec.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # a tied head is the embedding; transformers ignores a saved copy
    if score is not None:
        out[SCORE] = Lazy(score.meta(), score.load, score if isinstance(score, Entry) else None)
    expected = expected_names(spec, score is not None)
    for name in expected:
        if name not in out:
            raise InputError(f"{where}: missing tensor '{family.keys.hf(name, family.model_type)[0]}'")
    extra = sorted(set(out) - set(expected))
    if extra:
        hf = family.keys.hf(extra[0], family.model_type)[0]
        raise InputError(f"{where}: tensor '{hf}' does not fit config.json (unexpected)")
    shapes = canonical_shapes(spec)  # e.g. a router of other than num_experts rows: caught here,
    for name in expected:  # not as a target file that no model of this config loads
        got = tuple(out[name].meta.shape)
        if name in shapes and got != tuple(shapes[name]):
            hf = family.keys.hf(name, family.model_type)[0]
            raise InputError(f"{where}: tensor '{hf}' has shape {got} where config.json implies "
                             f"{tuple(shapes[name])}")
    return {name: out[name] for name in expected}


def _rows(entry: Entry, first: int, count: int) -> Entry:
    """Rows [first, first + count) of a tensor along dim 0: a byte range of their own."""
    size = entry.length // entry.shape[0] if entry.shape[0] else 0
    return Entry(entry.path, entry.start + first * size, count * size, entry.dtype, (count, *entry.shape[1:]))


def _experts(key: str, entry: Entry, templates: list[str], rule: ExpertStack, spec: ModelSpec,
             where: str) -> dict[str, Lazy]:
    """An expert stack's canonical tensors, each read by itself: dim 0 is outermost, so expert
    e's slice is a byte range of its own and pulling it never reads the stack; a part that is
    one block of rows of it (the whole slice, GATE_UP's gate, its up) is bytes unchanged, which
    a writer copies as they lie and the unified model maps."""
    n, width = rule.count(spec), entry.shape[1] if len(entry.shape) > 1 else 0
    blocks = [(0, width)] if isinstance(rule.inner, str) else rule.inner.blocks(rule.expert(spec))
    rows = sum(r for _, r in blocks)
    if len(entry.shape) < 2 or entry.shape[:2] != (n, rows):
        raise InputError(f"{where}: tensor '{key}' has shape {entry.shape} where config.json implies a "
                         f"stack of {n} experts of {rows} rows each")
    spans: list[list[tuple[int, int]]] = [[] for _ in templates]  # each part's (first row, rows)
    start = 0
    for part, count in blocks:
        spans[part].append((start, count))
        start += count
    out: dict[str, Lazy] = {}
    for e in range(n):
        expert = replace(_rows(entry, e, 1), shape=entry.shape[1:])
        for i, template in enumerate(templates):
            if len(spans[i]) == 1:
                piece = _rows(expert, *spans[i][0])
                out[template.format(e)] = Lazy(piece.meta(), piece.load, piece)
            else:  # rows from several blocks: the expert's slice read once per part, and cut
                meta = rule.cut(expert.meta(), spec)[i]
                out[template.format(e)] = Lazy(meta, lambda x=expert, i=i: rule.cut(x.load(), spec)[i])
    return out


def _check_computed(key: str, entry: Entry, rule: Computed, spec: ModelSpec, where: str) -> None:
    """A stored buffer the family computes from its config: it must be what the recipe makes
    (then dropping it loses nothing, and writing it again returns it bitwise)."""
    want = rule.make(spec, entry.dtype)
    if tuple(entry.shape) != tuple(want.shape):
        raise InputError(f"{where}: tensor '{key}' has shape {tuple(entry.shape)}, config.json implies "
                         f"{tuple(want.shape)}")
    if entry.length and not torch.equal(entry.load(), want):  # an entry without data: shape only
        raise InputError(f"{where}: tensor '{key}' is not what the family computes from config.json "
                         "(it would not be written back as stored)")


def _bias_names(spec: ModelSpec, feature: str) -> list[str]:
    """The feature's biases a model of this spec has when the feature is on (a non-gated MLP
    has no gate bias)."""
    has = set(canonical_names(spec.replace(**{feature: True})))
    return [n for i in range(spec.num_layers) for t in BIAS_KEYS[feature] if (n := t.format(i)) in has]


def prune_zero_biases(tensors: dict[str, Lazy], spec: ModelSpec) -> tuple[dict[str, Lazy], ModelSpec]:
    """Drop every bias feature whose tensors are all zero: a zero bias computes nothing, and
    dropping it lets llama -> qwen2 -> llama (which adds zero q, k, v biases) return bitwise."""
    for feature in BIAS_KEYS:
        names = _bias_names(spec, feature) if getattr(spec, feature) else []
        if names and not any(torch.count_nonzero(tensors[n].load()) for n in names):
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
    precision: str = "exact",
    declared: torch.dtype | None = None,
) -> tuple[dict[str, Lazy], list[str], list[str], list[FoldCost]]:
    """Canonical tensors of `spec` re-laid for `held` (what the target holds): biases the
    target always has are filled with zeros, foldable scalars moved into the weights (in the
    dtype `precision` chooses, reference/converters/folds.py; `declared` is the model's dtype).
    Returns the tensors, the caveats accepted by `allow`, the folds done and what each folded
    tensor cost, measured; any other difference raises, naming the feature."""
    tensors = dict(tensors)
    caveats: list[str] = []
    folds: list[str] = []
    costs: list[FoldCost] = []
    for feature in FEATURES:
        have, want = getattr(spec, feature), getattr(held, feature)
        if have == want:
            continue
        if feature in FOLDS:
            refold = Refold(FOLDS[feature], spec, have, want)
            for name in refold.fold.names(spec, set(tensors)):
                tensors[name], cost = _refold(name, tensors[name], refold, precision, declared)
                costs.append(cost)
            folds.append(f"{feature}: {have!r} -> {want!r}")
        elif feature in BIAS_KEYS and want:  # a zero bias computes the same as none
            for name in _bias_names(spec, feature):
                like = tensors[name.replace("bias", "weight")].meta
                zero = torch.zeros(bias_shape(spec, name), dtype=like.dtype)
                tensors[name] = Lazy(zero.to("meta"), lambda z=zero: z)
        elif feature in BIAS_KEYS:  # after prune_zero_biases, some tensor is nonzero
            name = next(n for n in _bias_names(spec, feature)
                        if torch.count_nonzero(tensors[n].load()))
            detail = f"'{key_of(name)}' is nonzero"
            raise Inexpressible(target, feature, detail, unified_holds(feature))
        elif feature in allow:
            caveats.append(f"dropped {feature}={have!r}: {target} computes without it")
        else:
            detail = f"the model has {feature}={have!r}, {target} holds only {want!r}"
            raise Inexpressible(target, feature, detail, unified_holds(feature))
    return tensors, caveats, folds, costs


def _refold(name: str, lazy: Lazy, refold: Refold, precision: str,
            declared: torch.dtype | None) -> tuple[Lazy, FoldCost]:
    """The folded tensor, lazy again, and its measured cost. The dtype it is written in depends
    on its values, and a safetensors header is written before any data: so the fold runs once
    here to choose and measure, and again when the writer pulls it (memory stays one tensor)."""
    like = torch.float32 if precision == "exact" else lazy.meta.dtype
    x = lazy.load()
    y = refold.forward(x, like)
    dtype = written_dtype(refold, x, y, precision, declared, like)
    cost = measure(name, refold, x, y.to(dtype), like)
    load = lambda: refold.forward(lazy.load(), like).to(dtype)  # noqa: E731
    return Lazy(torch.empty(lazy.meta.shape, dtype=dtype, device="meta"), load), cost


def retie(tensors: dict[str, Lazy], spec: ModelSpec, held: ModelSpec) -> tuple[dict[str, Lazy], ModelSpec]:
    """Make a fold of the embedding or head possible, or unnecessary, before the target is asked:
    a tied model whose embedding or head must change gets its own head (the original embedding);
    an untied model whose embedding is exactly its head times the multiplier the target applies
    (what folding a Gemma produced) is tied again, so gemma -> llama -> gemma returns bitwise."""
    if spec.tie_word_embeddings and any(getattr(spec, f) != getattr(held, f) for f in UNTIES):
        return {**tensors, "lm_head.weight": tensors["embed.weight"]}, spec.replace(tie_word_embeddings=False)
    m = held.embedding_multiplier
    if ("lm_head.weight" in tensors and not spec.tie_word_embeddings
            and is_default("embedding_multiplier", spec.embedding_multiplier)
            and not is_default("embedding_multiplier", m) and held.logits_divisor == spec.logits_divisor):
        head = tensors["lm_head.weight"].load()
        embed = tensors["embed.weight"].load()
        fold = FOLDS["embedding_multiplier"]
        # folded with the multiplier rounded to float32 (--fold-precision exact) or to the dtype
        if any(torch.equal(fold.apply(head, spec, m, inverse=False, like=like).to(embed.dtype), embed)
               for like in (torch.float32, head.dtype)):
            rest = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
            rest["embed.weight"] = tensors["lm_head.weight"]
            return rest, spec.replace(tie_word_embeddings=True, embedding_multiplier=m)
    return tensors, spec


def plan_target(
    tensors: Mapping[str, Lazy], family: Family, held: ModelSpec, dtype: torch.dtype | None
) -> list[Planned]:
    """The target's tensors in canonical order (fused ones merged), cast to `dtype` if given;
    a score head, if the tensors have one, last and by its own name (no lm_head then)."""
    score = SCORE in tensors
    homes: dict[str, dict[int, str]] = {}
    for name in expected_names(held, score)[:-1] if score else canonical_names(held):
        hf, part = family.keys.hf(name, family.model_type)
        homes.setdefault(hf, {})[part] = name
    planned = []
    for hf, parts in homes.items():
        rule = family.keys.rule(hf.format(0))  # a Stacked home names its rows with {}
        if isinstance(rule, Stacked):
            whole = tensors[parts[0]]
            for i in range(whole.meta.shape[0]):
                row = Lazy(whole.meta[i], lambda w=whole, i=i: w.load()[i].clone())
                planned.append(_planned(hf.format(i), row, dtype))
            continue
        if isinstance(rule, ExpertStack):  # built one expert at a time, into the stack
            k = len(rule.parts)
            experts = [[parts[e * k + i] for i in range(k)] for e in range(rule.count(held))]
            meta = rule.merge(([tensors[n].meta for n in ns] for ns in experts), held)
            load = lambda r=rule, es=experts: r.merge(  # noqa: E731
                ([tensors[n].load() for n in ns] for ns in es), held)
            planned.append(_planned(hf, Lazy(meta, load), dtype))
            continue
        if isinstance(rule, Fused):
            names = [parts[i] for i in range(len(rule.parts))]
            meta = rule.merge([tensors[n].meta for n in names], held)
            load = lambda r=rule, ns=names: r.merge([tensors[n].load() for n in ns], held)  # noqa: E731
            lazy = Lazy(meta, load)
        else:
            lazy = tensors[parts[0]]
        planned.append(_planned(hf, lazy, dtype))
    like = next(p.dtype for p in planned if p.name == family.keys.hf("embed.weight", family.model_type)[0])
    for hf, rule in family.keys.computed(held.num_layers):
        made = rule.make(held, like)
        planned.append(Planned(hf, made.dtype, tuple(made.shape), lambda m=made: m, None))
    if score:
        planned.append(_planned(SCORE, tensors[SCORE], dtype))
    return planned


def _planned(name: str, lazy: Lazy, dtype: torch.dtype | None) -> Planned:
    """One target tensor, cast to `dtype` if given and floating."""
    cast = dtype is not None and lazy.meta.is_floating_point() and lazy.meta.dtype != dtype
    out_dtype = dtype if cast else lazy.meta.dtype
    produce = (lambda: lazy.load().to(out_dtype)) if cast else lazy.load
    return Planned(name, out_dtype, tuple(lazy.meta.shape), produce, None if cast else lazy.entry,
                   None if cast else lazy.rows)
