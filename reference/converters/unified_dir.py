"""The unified directory format: the unified model's own checkpoint.

Safetensors shards whose tensor names are exactly `canonical_names(spec)` (no prefix; a reward
model's: the same without `lm_head.*`, plus `score.weight`), an index when sharded, and
config.json with `model_type: "reference_unified"`, the spec under `spec`, and the source
family's own config.json kept whole under `source_config`, so that converting back writes it
back.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reference.converters.hf_dir import read_config
from reference.converters.plan import SCORE, Lazy, check_score, expected_names
from reference.converters.safetensors_io import Planned, Progress, read_dir, write_dir
from reference.errors import InputError
from reference.families.registry import family_named, family_of
from reference.families.spec import ModelSpec
from reference.families.verdict import Unified

if TYPE_CHECKING:
    from reference.converters.source import Source

MODEL_TYPE = "reference_unified"
ARCHITECTURE = "UnifiedForCausalLM"
REWARD_ARCHITECTURE = "UnifiedForRewardModel"  # with a score head: the trunk's names + score.weight


def held(spec: ModelSpec) -> ModelSpec:
    """What the unified model holds of a spec: everything it computes, exactly."""
    return Unified().express(spec)


def is_unified_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def spec_of(cfg: Mapping[str, Any], where: str) -> ModelSpec:
    """The ModelSpec a unified config.json carries."""
    try:
        return ModelSpec(**cfg["spec"])
    except (KeyError, TypeError) as e:
        raise InputError(f"{where}: not a unified config ({e})") from None


def read_unified(path: Path) -> Source:
    """A unified directory as a Source: tensors are canonical already."""
    from reference.converters.source import Source, passthrough

    where = str(path / "config.json")
    cfg = read_config(path)
    spec = spec_of(cfg, where)
    source_config = cfg.get("source_config")
    family = family_of(source_config, where) if source_config else family_named("llama")
    entries = read_dir(path)
    score = SCORE in entries
    if score:
        check_score(entries[SCORE].meta(), spec, str(path))
    expected = expected_names(spec, score)
    missing = [n for n in expected if n not in entries]
    if missing:
        raise InputError(f"{path}: missing tensor '{missing[0]}'")
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise InputError(f"{path}: tensor '{extra[0]}' does not fit config.json (unexpected)")
    tensors = {n: Lazy(entries[n].meta(), entries[n].load, entries[n]) for n in expected}
    return Source(path, family, spec, passthrough(cfg), tensors, str, source_config)


def unified_config(spec: ModelSpec, source_config: Mapping[str, Any] | None,
                   extra: Mapping[str, Any], score: bool = False) -> dict[str, Any]:
    """config.json of a unified directory (what UnifiedConfig.to_dict holds, without transformers)."""
    architecture = REWARD_ARCHITECTURE if score else ARCHITECTURE
    return {"architectures": [architecture], "model_type": MODEL_TYPE, **extra,
            "spec": dataclasses.asdict(spec), "source_config": dict(source_config) if source_config else None}


@dataclass(frozen=True)
class UnifiedTarget:
    """The unified directory format as a conversion target."""

    source_config: Mapping[str, Any] | None
    max_shard_bytes: int | None  # None: one file
    name: str = "unified"

    def express(self, spec: ModelSpec) -> ModelSpec:
        return held(spec)

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        return Unified().refuses(spec)

    def write(self, tensors: Mapping[str, Lazy], held: ModelSpec, extra: Mapping[str, Any],
              dtype: torch.dtype | None, out: Path, progress: Progress | None = None) -> tuple[int, int]:
        planned = []
        score = SCORE in tensors
        for name in expected_names(held, score):
            lazy = tensors[name]
            cast = dtype is not None and lazy.meta.is_floating_point() and lazy.meta.dtype != dtype
            if cast:
                produce = lambda lz=lazy: lz.load().to(dtype)  # noqa: E731
                planned.append(Planned(name, dtype, tuple(lazy.meta.shape), produce))
            else:
                planned.append(Planned(name, lazy.meta.dtype, tuple(lazy.meta.shape), lazy.load, lazy.entry))
        extra = dict(extra)
        if dtype is not None:
            extra["dtype"] = str(dtype).removeprefix("torch.")
        write_dir(planned, out, self.max_shard_bytes, progress)
        config = unified_config(held, self.source_config, extra, score)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return len(planned), sum(t.nbytes for t in planned)
