"""The gate (`nox -s equivalence`): every registered family x every target that accepts it.

For each case: the original transformers model reproduces its golden; the converted
checkpoint loads with no missing or unexpected key and its logits equal the golden (fp32,
default tolerance); converting back is bitwise.
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    BUILT,
    TIES,
    assert_bitwise,
    conversion_cases,
    load_golden,
    read_tensors,
    refusal_cases,
    tiny_spec,
)
from transformers import AutoModelForCausalLM

from reference.converters import convert
from reference.errors import Inexpressible
from reference.families.registry import FAMILIES
from reference.families.verdict import blocking
from reference.tiny import logits, save_tiny, tiny_model


@pytest.mark.parametrize("tie", TIES, ids=["untied", "tied"])
@pytest.mark.parametrize("family", BUILT)
def test_transformers_reproduces_golden(family: str, tie: bool) -> None:
    golden, made_with = load_golden(family, tie)
    import transformers

    try:
        torch.testing.assert_close(logits(tiny_model(family, tie=tie)), golden)
    except AssertionError as e:
        raise AssertionError(
            f"upstream drift: transformers {transformers.__version__} / torch {torch.__version__} "
            f"no longer reproduce the {family} golden made with {made_with}"
        ) from e


@pytest.mark.parametrize(("source", "target", "tie"), conversion_cases())
def test_converted_logits_equal_original(source: str, target: str, tie: bool, tmp_path) -> None:
    src = save_tiny(source, tmp_path / "src", tie=tie)
    there = convert(src, tmp_path / "dst", to=target)
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dst", output_loading_info=True, attn_implementation="eager"
    )
    assert type(model).__name__ == FAMILIES[target].architecture
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    golden, _ = load_golden(source, tie)
    torch.testing.assert_close(logits(model), golden)

    back = convert(tmp_path / "dst", tmp_path / "back", to=source)
    if there.folds or back.folds:  # values were moved into weights: exact in the logits
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
        torch.testing.assert_close(logits(again), golden)
    else:  # only rearranged: bitwise
        assert_bitwise(read_tensors(src), read_tensors(tmp_path / "back"))


@pytest.mark.parametrize(("source", "target", "tie"), refusal_cases())
def test_refusal_names_the_feature(source: str, target: str, tie: bool, tmp_path) -> None:
    spec = tiny_spec(source, tie)
    features = blocking(spec, FAMILIES[target].express(spec))
    src = save_tiny(source, tmp_path / "src", tie=tie)
    with pytest.raises(Inexpressible) as e:
        convert(src, tmp_path / "dst", to=target)
    assert e.value.feature in features and e.value.feature in str(e.value)
    assert "--to unified" in str(e.value)
    assert not (tmp_path / "dst").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
