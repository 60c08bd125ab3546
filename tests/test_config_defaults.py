"""A config.json that leaves fields out means what its transformers class fills in.

Published configs do leave fields out (Mistral-7B-v0.1 relies on its class for nothing, but
hand-written and older configs do), and some carry legacy values their class rewrites (every
Gemma release says `hidden_act: "gelu"` and runs the tanh approximation). The converted model
must compute what transformers computes from the same file.
"""

from __future__ import annotations

import json

import pytest
import torch
from harness import conversion_cases
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from reference.converters import convert
from reference.errors import Inexpressible, InputError
from reference.families.registry import FAMILIES
from reference.tiny import logits, save_tiny

# What a checkpoint cannot leave out (the shapes of its tensors; token ids, which the class
# checks against the vocabulary but which do not change the logits), and nothing else.
KEPT = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
TO_LLAMA = sorted({s for s, t, _ in conversion_cases() if t == "llama" and s in CONFIG_MAPPING})


def strip_config(path, **extra) -> None:
    """Leave only the KEPT fields (and `extra`) in path/config.json."""
    cfg = json.loads((path / "config.json").read_text())
    kept = {k: cfg[k] for k in KEPT if k in cfg}
    (path / "config.json").write_text(json.dumps({**kept, **extra}))


@pytest.mark.parametrize("family", TO_LLAMA)
def test_a_config_of_shapes_only_converts_to_what_transformers_computes(family: str, tmp_path) -> None:
    src = save_tiny(family, tmp_path / "src")
    strip_config(src)
    original = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
    # The class may default to a window (Mistral: 4096), longer than the input here.
    convert(src, tmp_path / "dst", to="llama", allow=("sliding_window",))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="eager")
    torch.testing.assert_close(logits(converted), logits(original))


def test_gemma_legacy_gelu_is_the_tanh_approximation(tmp_path) -> None:
    src = save_tiny("gemma", tmp_path / "src")
    strip_config(src, hidden_act="gelu")  # as every Gemma release writes it
    original = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
    convert(src, tmp_path / "dst", to="llama")
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="eager")
    torch.testing.assert_close(logits(converted), logits(original))


def test_mistral_without_a_window_field_has_its_class_window(tmp_path) -> None:
    src = save_tiny("mistral", tmp_path / "src")
    strip_config(src)  # MistralConfig's default window is 4096, under its default 32768 positions
    with pytest.raises(Inexpressible) as e:
        convert(src, tmp_path / "dst", to="llama")
    assert e.value.feature == "sliding_window" and "4096" in str(e.value)
    assert not (tmp_path / "dst").exists()


def test_a_config_its_class_rejects_is_named(tmp_path) -> None:
    src = save_tiny("qwen2", tmp_path / "src")
    strip_config(src, layer_types=["full_attention"])  # one entry for two layers
    with pytest.raises(InputError) as e:
        convert(src, tmp_path / "dst", to="llama")
    message = str(e.value)
    assert str(src / "config.json") in message and "layer_types" in message and "\n" not in message
    assert not (tmp_path / "dst").exists()


def test_every_family_with_a_class_is_covered() -> None:
    """A new family with a transformers class that converts to Llama joins the test above."""
    assert {"qwen2", "mistral", "phi3", "gemma", "granite"} <= set(TO_LLAMA)
    assert all(FAMILIES[f].keys is not None for f in TO_LLAMA)
