"""Any checkpoint this package reads (an HF family's, a unified or a Megatron one) -> any target
(an HF family, unified, Megatron) through the canonical description, streamed and atomic."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from reference.converters.files import atomic_dir, side_files
from reference.converters.folds import PRECISIONS, FoldCost
from reference.converters.hf_dir import read_beside
from reference.converters.hf_target import HFTarget
from reference.converters.plan import SCORE, Lazy, adapt, prune_zero_biases, refuse_score, retie
from reference.converters.safetensors_io import INDEX, SINGLE, Progress
from reference.converters.source import RECORD, Source, open_source
from reference.converters.unheld import drop_unheld
from reference.converters.unified_dir import UnifiedTarget
from reference.errors import Inexpressible, InputError
from reference.families.registry import family_named
from reference.families.spec import BIAS_KEYS, ModelSpec
from reference.families.verdict import Holder, blocking, unified_holds

DEFAULT_SHARD_BYTES = 5 * 2**30  # when the source has no safetensors shards to follow


@dataclass
class Report:
    """What a conversion did, for the CLI to print and for DST/conversion.json."""

    source: str
    target: str
    tensors: int = 0
    bytes: int = 0
    caveats: list[str] = field(default_factory=list)
    folds: list[str] = field(default_factory=list)  # features moved into the weights
    fold_costs: list[dict[str, Any]] = field(default_factory=list)  # per folded tensor, measured
    # The first source's config.json, carried so that converting back restores it, and its
    # fields the written config.json does not hold.
    source_config: dict[str, Any] | None = None
    dropped_fields: list[str] = field(default_factory=list)
    read_as: list[str] = field(default_factory=list)  # how the source was read (FP8 dequantized)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A torch floating dtype from its name (`bf16`, `bfloat16`, `float32`, ...)."""
    if name is None:
        return None
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"--dtype: '{name}' is not a floating dtype (try bfloat16, float16, float32)")
    return dtype


class Target(Holder, Protocol):
    """A layout canonical tensors can be written in (an HF family, Megatron, unified)."""

    def write(self, tensors: Mapping[str, Lazy], held: ModelSpec, extra: Mapping[str, Any],
              dtype: torch.dtype | None, out: Path, progress: Progress | None = None) -> tuple[int, int]: ...


def source_shard_bytes(src: Path) -> int | None:
    """The output is sharded as the source was: one file (None, no limit) from one file, else
    shards of at most the source's largest (users expect as many shards back, and one 100 GB
    file is slower to write and to copy)."""
    if (src / SINGLE).is_file() and not (src / INDEX).exists():  # read_dir prefers the index
        return None
    sizes = [p.stat().st_size for p in src.glob("*.safetensors")]
    return max(sizes) if sizes else DEFAULT_SHARD_BYTES


def resolve_target(to: str, source: Source, max_shard_bytes: int | None, layout: Any) -> Target:
    """The writer for `--to`: `unified`, `megatron`, `hf` (the family the source came from) or a family."""
    if to == "unified":
        return UnifiedTarget(source.config, max_shard_bytes)
    if to == "megatron":
        from reference.converters.megatron import MegatronLayout, MegatronTarget

        return MegatronTarget(source.family.model_type, layout or MegatronLayout())
    family = source.family if to == "hf" else family_named(to)
    own = source.config if source.config and source.config.get("model_type") == family.model_type else None
    return HFTarget(family, max_shard_bytes, own, read_beside(source.path, family) if own else {})


@dataclass(frozen=True)
class Prepared:
    """Canonical tensors re-laid for a target, before anything is written."""

    tensors: dict[str, Lazy]
    held: ModelSpec
    caveats: list[str]
    folds: list[str]
    costs: list[FoldCost]


def prepare(source: Source, target: Target, allow: Collection[str] = (),
            fold_precision: str = "exact") -> Prepared:
    """Refuse what the target cannot express (before reading any tensor where the config
    decides), then drop zero biases, untie or retie, fill and fold: still lazy."""
    early = [f for f in blocking(source.spec, target.express(source.spec))
             if f not in BIAS_KEYS and f not in allow]
    if early:
        f = early[0]
        have, want = getattr(source.spec, f), getattr(target.express(source.spec), f)
        raise Inexpressible(target.name, f, f"the model has {f}={have!r}, {target.name} holds only {want!r}",
                            unified_holds(f))
    refused = target.refuses(source.spec)  # dimensions, not features: an activation, a rope type
    if refused:
        raise Inexpressible(target.name, *next(iter(refused.items())), unified_holds=True)
    if source.family.keys is None:
        raise InputError(f"{source.path}: the tensor layout of {source.family.model_type} "
                             "is not mapped yet")
    if SCORE in source.tensors and isinstance(target, HFTarget):
        refuse_score(target.name, f"{source.path} (a reward model) --to {target.name}")
    elif SCORE in source.tensors and not isinstance(target, UnifiedTarget):
        raise InputError(f"{source.path}: a reward model (score.weight) cannot be written as {target.name}; "
                         "convert it to its family or to unified")
    tensors, spec = prune_zero_biases(source.tensors, source.spec)
    tensors, spec = retie(tensors, spec, target.express(spec))
    held = target.express(spec)
    declared = source.extra.get("dtype")
    declared = getattr(torch, declared, None) if isinstance(declared, str) else None
    tensors, caveats, folds, costs = adapt(tensors, spec, held, source.key_of, target.name, allow,
                                           fold_precision, declared)
    if source.spec.tie_word_embeddings and not held.tie_word_embeddings:
        caveats.append(f"untied: {target.name} folds the embedding and the head differently, so they are "
                       "two tensors from here on")
    return Prepared(tensors, held, caveats, folds, costs)


def dropped_fields(origin: Mapping[str, Any] | None, out: Path) -> list[str]:
    """Fields of the first source's config.json that the written config.json does not hold
    (a unified directory keeps that config whole; a Megatron checkpoint has no config.json)."""
    written = out / "config.json"
    if origin is None or not written.is_file():
        return []
    held = json.loads(written.read_text())
    if held.get("source_config") == origin:
        return []
    return sorted(k for k in origin if k not in held and k not in ("architectures", "transformers_version"))


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    dtype: str | None = None,
    force: bool = False,
    allow: Collection[str] = (),
    max_shard_bytes: int | None = None,
    layout: Any = None,
    progress: Progress | None = None,
    fold_precision: str = "exact",
    family: str | None = None,
) -> Report:
    """Convert the checkpoint at SRC (an HF family's, a unified or a Megatron directory) into
    `to` at DST; DST appears whole or not at all.

    `to` is a family's model_type, `hf` (back to the family the checkpoint came from),
    `unified` (the unified model's own format) or `megatron` (laid out by `layout`, a
    MegatronLayout). `allow` names features the user
    accepts dropping (e.g. `sliding_window`, or `mtp`: DeepSeek-V3's multi-token-prediction
    layer, unheld.py); each is recorded in DST/conversion.json.
    HF output shards hold at most `max_shard_bytes` (default: as `source_shard_bytes` says).
    `progress`, if given, is told (bytes written, bytes in all) as the tensors are written.
    `fold_precision` is `exact` (a folded tensor is written in float32 where its dtype cannot
    hold the fold exactly) or `dtype` (keep every dtype, round the fold); see folds.py.
    `family` names the family of a Megatron-LM source that records none (--family).
    """
    src, dst = Path(src), Path(dst)
    cast = parse_dtype(dtype)
    source = open_source(src, family, dtype=cast)
    config, dropped = drop_unheld(source.unheld, source.config, allow, str(src))
    source = dataclasses.replace(source, config=config)
    shard_bytes = max_shard_bytes or source_shard_bytes(src)
    target = resolve_target(to, source, shard_bytes, layout)
    if fold_precision not in PRECISIONS:
        raise InputError(f"--fold-precision: '{fold_precision}' is not one of {', '.join(PRECISIONS)}")
    prepared = prepare(source, target, allow, fold_precision)
    with atomic_dir(dst, force) as out:
        count, size = target.write(prepared.tensors, prepared.held, source.extra, cast, out, progress)
        for path in side_files(src):
            shutil.copy2(path, out / path.name)
        report = Report(source.family.model_type, target.name, count, size, dropped + prepared.caveats,
                        prepared.folds, [asdict(c) for c in prepared.costs], source.config,
                        dropped_fields(source.config, out), list(source.read_as))
        (out / RECORD).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
