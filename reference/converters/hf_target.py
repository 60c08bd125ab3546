"""Writing canonical tensors as an HF family's checkpoint: sharded safetensors + config.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reference.converters.plan import SCORE, Lazy, plan_target, refuse_score, sequence_classifier
from reference.converters.safetensors_io import Progress, write_dir
from reference.families.family import Family
from reference.families.resolve import as_loaded
from reference.families.spec import FOLDABLE, ModelSpec


@dataclass(frozen=True)
class HFTarget:
    """An HF family as a conversion target."""

    family: Family
    max_shard_bytes: int | None  # None: one file
    # The config.json the weights first came with, when it is of this family (a unified
    # directory or a conversion record carries it): its scalar features are folded back out of
    # the weights, and it is written back whole while the weights still describe it, so that
    # family -> llama -> family returns every field of the config, not only the tensors.
    source_config: Mapping[str, Any] | None = None
    # The text of the files beside the source's config.json that reading source_config needs
    # (Family.beside: ChatGLM's modeling file says what its rope_ratio means).
    files: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.family.model_type

    def express(self, spec: ModelSpec) -> ModelSpec:
        held = self.family.express(spec)
        if self.source_config is None:
            return held
        origin = self.family.express(self._origin())
        return held.replace(**{f: getattr(origin, f) for f in FOLDABLE})

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        return self.family.refuses(spec)

    def _origin(self) -> ModelSpec:
        where = f"{self.name} source config"
        return self.family.read(as_loaded(self.source_config, where), where, self.files)

    def _describes(self, held: ModelSpec) -> bool:
        """Whether the weights still compute what the first config says; tying aside, which a
        fold may have had to undo (written as it is now)."""
        return self._origin().replace(tie_word_embeddings=held.tie_word_embeddings) == held

    def write(
        self,
        tensors: Mapping[str, Lazy],
        held: ModelSpec,
        extra: Mapping[str, Any],
        dtype: torch.dtype | None,
        out: Path,
        progress: Progress | None = None,
    ) -> tuple[int, int]:
        """Write into `out`; returns (tensors, bytes) written. With a score head, the family's
        sequence-classification checkpoint (num_labels=1)."""
        score = SCORE in tensors
        if score:
            refuse_score(self.name, f"--to {self.name}")
        planned = plan_target(tensors, self.family, held, dtype)
        extra = dict(extra)
        if dtype is not None:
            extra["dtype"] = str(dtype).removeprefix("torch.")
        config = self.family.config(held, extra)
        if score:
            config.update(architectures=[sequence_classifier(self.name)], id2label={"0": "LABEL_0"},
                          label2id={"LABEL_0": 0})
        if self.source_config is not None and self._describes(held):
            # the fields every family shares (token ids, dtype) are as the last hop left them,
            # the dtype under the name the first config gave it (transformers 4.x: torch_dtype)
            if "torch_dtype" in self.source_config and "dtype" not in self.source_config and "dtype" in extra:
                extra["torch_dtype"] = extra.pop("dtype")
            config = {**self.source_config, **extra}
            if self._origin().tie_word_embeddings != held.tie_word_embeddings:
                config["tie_word_embeddings"] = held.tie_word_embeddings
        as_loaded(config, f"the converted {self.name} config.json")  # its config class judges it first
        write_dir(planned, out, self.max_shard_bytes, progress)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return len(planned), sum(t.nbytes for t in planned)
