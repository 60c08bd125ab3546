"""A family is one row: its config codecs and its key map. Nothing here branches on a name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reference.families.config import LLAMA_FIELDS, Codec, read_spec, write_fields
from reference.families.keymap import KeyMap
from reference.families.spec import DEFAULT_FEATURES, ModelSpec


@dataclass(frozen=True, kw_only=True)
class Family:
    """How one HF model family stores a ModelSpec: config fields, features and tensor names."""

    model_type: str
    architecture: str
    keys: KeyMap | None  # None: recognised and refused by feature; tensors not mapped yet
    fields: Mapping[str, str] = field(default_factory=lambda: LLAMA_FIELDS)
    # Features not named by any codec are fixed at ModelSpec's default (Llama's value).
    codecs: tuple[Codec, ...] = ()
    tie_default: bool = False

    @property
    def name(self) -> str:
        """Its name as a holder of models (verdict.Holder): the model_type."""
        return self.model_type

    def read(self, cfg: Mapping[str, Any], where: str, files: Mapping[str, str] | None = None) -> ModelSpec:
        """The spec of an HF config of this family; `files`: the text of the files beside it
        that its codecs read (`beside`), those present."""
        return read_spec(cfg, self.fields, self.codecs, where, self.tie_default, files)

    @property
    def beside(self) -> tuple[str, ...]:
        """Files beside config.json that reading its config needs, when the checkpoint has them."""
        return tuple(dict.fromkeys(f for codec in self.codecs for f in codec.files()))

    def express(self, spec: ModelSpec) -> ModelSpec:
        """The nearest spec this family can hold; differences are for the caller to judge."""
        held = dict(DEFAULT_FEATURES)
        for codec in self.codecs:
            held.update(codec.express(spec))
        return spec.replace(**held)

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        """Fields of the spec's dimensions this family cannot write, each with why (a layout
        that stores rope as a bare base cannot hold rope scaling)."""
        out: dict[str, str] = {}
        for codec in self.codecs:
            out.update(codec.refuses(spec))
        return out

    def config(self, spec: ModelSpec, extra: Mapping[str, Any]) -> dict[str, Any]:
        """config.json for a spec this family holds exactly (see `express`)."""
        out = {"architectures": [self.architecture], "model_type": self.model_type}
        out.update(extra)
        out.update(write_fields(spec, self.fields, self.codecs))
        return out
