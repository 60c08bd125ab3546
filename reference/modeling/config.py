"""UnifiedConfig: a transformers config that carries the canonical ModelSpec.

The spec is the whole description of what the model computes; the usual transformers fields
(hidden_size, num_hidden_layers, ...) are derived from it, for the library code that reads them
(generation, caches, rope initialisers), and are never read back as a second source of truth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from reference.families.spec import ModelSpec

MODEL_TYPE = "reference_unified"


class UnifiedConfig(PretrainedConfig):
    """`spec`: a ModelSpec as a dict; `source_config`: the config.json of the family the weights
    came from, kept whole so that converting back gives it back."""

    model_type = MODEL_TYPE

    def __init__(self, spec: dict[str, Any] | None = None, source_config: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.spec = dict(spec or {})
        self.source_config = source_config
        if self.spec:
            s = self.model_spec()
            kwargs.update(
                vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim,
                max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=s.tie_word_embeddings,
                # transformers' rope initialisers read the partial factor from here
                rope_parameters={**s.rope_parameters, "partial_rotary_factor": s.rotary_fraction},
            )
        super().__init__(**kwargs)

    @classmethod
    def from_spec(cls, spec: ModelSpec, source_config: dict[str, Any] | None = None,
                  **kwargs: Any) -> UnifiedConfig:
        return cls(spec=dataclasses.asdict(spec), source_config=source_config, **kwargs)

    def model_spec(self) -> ModelSpec:
        return ModelSpec(**self.spec)
