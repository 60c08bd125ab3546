"""Weight names as data: HF name templates <-> canonical templates, inverse derived.

A template holds `{}` where the layer number goes. `None` as a canonical name means the HF
tensor is known and deliberately dropped (e.g. rotary caches some checkpoints carry).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from reference.errors import ReferenceError


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


class KeyMap:
    """A bijection between HF and canonical templates, plus HF keys that are dropped."""

    def __init__(self, hf_to_canonical: Mapping[str, str | None]) -> None:
        self.to_canonical = dict(hf_to_canonical)
        renames = {h: c for h, c in self.to_canonical.items() if c is not None}
        self.to_hf = {c: h for h, c in renames.items()}
        if len(self.to_hf) != len(renames):
            raise ValueError("key map is not one-to-one")
        self._hf = [(_pattern(h), c) for h, c in self.to_canonical.items()]
        self._canonical = [(_pattern(c), h) for c, h in self.to_hf.items()]

    @staticmethod
    def _apply(patterns: list[tuple[re.Pattern[str], str | None]], key: str) -> str | None:
        for pattern, template in patterns:
            match = pattern.match(key)
            if match:
                return None if template is None else template.format(*match.groups())
        raise KeyError(key)

    def canonical(self, hf_key: str, where: str) -> str | None:
        """Canonical name of an HF key (None: dropped); an unknown key raises, naming it."""
        try:
            return self._apply(self._hf, hf_key)
        except KeyError:
            raise ReferenceError(f"{where}: unknown tensor '{hf_key}' for this family") from None

    def hf(self, canonical_key: str, family: str) -> str:
        """HF name of a canonical key; a key the family has no place for raises, naming it."""
        try:
            name = self._apply(self._canonical, canonical_key)
        except KeyError:
            raise ReferenceError(f"{family} has no tensor for canonical '{canonical_key}'") from None
        assert name is not None
        return name


LLAMA_KEYS = KeyMap({
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    **{
        f"model.layers.{{}}.self_attn.{p}_proj.{w}": f"layers.{{}}.attn.{p}.{w}"
        for p in ("q", "k", "v", "o") for w in ("weight", "bias")
    },
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    **{
        f"model.layers.{{}}.mlp.{p}_proj.{w}": f"layers.{{}}.mlp.{p}.{w}"
        for p in ("gate", "up", "down") for w in ("weight", "bias")
    },
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    # Older checkpoints saved rotary caches as buffers; they are recomputed from the config.
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
})
