"""Every family this project knows, one row each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reference.errors import ReferenceError
from reference.families.config import Fixed, Flag, Window
from reference.families.family import Family
from reference.families.keymap import LLAMA_KEYS

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    keys=LLAMA_KEYS,
    codecs=(Flag("attention_bias", ("qkv_bias", "o_bias")), Flag("mlp_bias", ("mlp_bias",))),
)

QWEN2 = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    keys=LLAMA_KEYS,
    codecs=(Fixed("qkv_bias", True), Window(switch="use_sliding_window")),
)

QWEN3 = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    keys=LLAMA_KEYS,
    codecs=(
        Flag("attention_bias", ("qkv_bias", "o_bias")),
        Fixed("qk_norm", True),
        Window(switch="use_sliding_window"),
    ),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, QWEN2, QWEN3)}


def family_named(name: str) -> Family:
    """The family registered under a model_type; an unknown one raises, listing the known."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ReferenceError(f"unknown model family '{name}' (known: {known})") from None


def family_of(cfg: Mapping[str, Any], where: str) -> Family:
    """The family of an HF config, from its model_type."""
    if "model_type" not in cfg:
        raise ReferenceError(f"{where}: no 'model_type' field")
    try:
        return family_named(cfg["model_type"])
    except ReferenceError as e:
        raise ReferenceError(f"{where}: {e}") from None
