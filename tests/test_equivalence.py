"""The gate (`nox -s equivalence`): every registered family x every target that accepts it.

For each case: the converted checkpoint loads with no missing or unexpected key and its logits
equal the original model's, run in this process (fp32, default tolerance); converting back is
bitwise. Separately, the original reproduces its golden within the golden's measured spread:
goldens guard against upstream drift only, never a conversion.
"""

from __future__ import annotations

import json

import pytest
import torch
from harness import (
    BUILT,
    TIES,
    assert_bitwise,
    check_golden,
    conversion_cases,
    read_tensors,
    refusal_cases,
    refused_by,
    tiny_spec,
)
from transformers import AutoModelForCausalLM

from reference.converters import convert
from reference.errors import Inexpressible
from reference.families.registry import FAMILIES
from reference.families.verdict import unified_holds
from reference.tiny import logits, save_tiny, tiny_model


@pytest.mark.parametrize("tie", TIES, ids=["untied", "tied"])
@pytest.mark.parametrize("family", BUILT)
def test_transformers_reproduces_golden(family: str, tie: bool) -> None:
    check_golden(family, tie, logits(tiny_model(family, tie=tie)))


@pytest.mark.parametrize(("source", "target", "tie"), conversion_cases())
def test_converted_logits_equal_original(source: str, target: str, tie: bool, tmp_path) -> None:
    original = tiny_model(source, tie=tie)
    original.save_pretrained(tmp_path / "src")
    src, want = tmp_path / "src", logits(original)
    there = convert(src, tmp_path / "dst", to=target)
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dst", output_loading_info=True, attn_implementation="eager"
    )
    assert type(model).__name__ == FAMILIES[target].architecture
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(logits(model), want)

    back = convert(tmp_path / "dst", tmp_path / "back", to=source)
    if there.folds or back.folds:  # values were moved into weights: exact in the logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
        torch.testing.assert_close(logits(again), want)
    else:  # only rearranged: bitwise
        assert_bitwise(read_tensors(src), read_tensors(tmp_path / "back"))
    # every field of the source's config.json comes back; what the target lacked was recorded.
    # A tied model whose embedding and head are folded differently (a multiplier on one, a
    # divisor on the other) has two tensors from then on, and says so; it is tied again on the
    # way back only where the folds allow it (Gemma's embedding scale).
    config = [json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back")]
    held = json.loads((tmp_path / "dst" / "config.json").read_text())
    if tie and not held["tie_word_embeddings"]:
        assert any("untied" in c for c in there.caveats)
        config[1]["tie_word_embeddings"] = True
    assert config[0] == config[1]
    kept_apart = {"architectures", "transformers_version"}
    assert there.dropped_fields == sorted(set(config[0]) - set(held) - kept_apart)


@pytest.mark.parametrize(("source", "target", "tie"), refusal_cases())
def test_refusal_names_the_feature(source: str, target: str, tie: bool, tmp_path) -> None:
    spec = tiny_spec(source, tie)
    features = refused_by(spec, target)
    src = save_tiny(source, tmp_path / "src", tie=tie)
    with pytest.raises(Inexpressible) as e:
        convert(src, tmp_path / "dst", to=target)
    assert e.value.feature in features and e.value.feature in str(e.value)
    assert ("--to unified" in str(e.value)) == unified_holds(e.value.feature)
    assert not (tmp_path / "dst").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
