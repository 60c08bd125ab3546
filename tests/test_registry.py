"""A registered family must come with a tiny config, goldens and equivalence cases."""

from __future__ import annotations

import pytest
from harness import MEGATRON_FAMILIES, TIES, UNIFIED_HELD, conversion_cases, golden_path
from layouts import CONFIGS as LAYOUTS

from reference.families.registry import FAMILIES
from reference.tiny import TINY


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_complete(family: str) -> None:
    if family in LAYOUTS:  # no class in transformers: a tiny layout and a reference forward
        assert golden_path(family, False).is_file(), f"{family}: no golden; run `nox -s goldens`"
        return
    assert family in TINY, f"{family}: add its tiny config to reference/tiny.py TINY"
    for tie in TIES:
        path = golden_path(family, tie)
        assert path.is_file(), f"{family}: no golden {path.name}; run `nox -s goldens`"
    if FAMILIES[family].keys is None:  # recognised by features only: every target must refuse it
        converts = [c for c in conversion_cases() if c[0] == family]
        assert not converts, f"{family}: a target accepts it, but it has no key map"
        return
    # A key map is proven only by converting or loading through it and comparing logits.
    exact = [c for c in conversion_cases() if family in c[:2]]
    proven = exact or family in MEGATRON_FAMILIES or family in UNIFIED_HELD
    assert proven, f"{family}: no target holds it; nothing proves its key map"


def test_no_golden_without_a_family() -> None:
    known = {golden_path(f, t).name for f in FAMILIES for t in TIES if f not in LAYOUTS or not t}
    stray = sorted(p.name for p in golden_path("x", False).parent.glob("*.safetensors"))
    assert set(stray) <= known, f"goldens with no registered family: {set(stray) - known}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].keys is not None])
def test_a_dimension_written_is_read_back_or_refused(family: str) -> None:
    """Every dimension of a spec (GQA heads, a head_dim that is not hidden / heads, ...) either
    reads back from the config.json the family writes, or the family refuses it by name: a
    config with no field for it would silently describe another model (qwen v1 once wrote a
    GQA model as MHA)."""
    from reference.families.spec import DIMENSIONS
    from reference.families.verdict import blocking
    from reference.tiny import tiny_config

    spec = FAMILIES["llama"].read(tiny_config("llama").to_dict(), "llama")
    assert 1 < spec.num_heads // spec.num_kv_heads < spec.num_heads  # GQA, groups neither 1 nor heads
    f = FAMILIES[family]
    held = f.express(spec)
    if blocking(spec, held) or f.refuses(held):
        return  # refused: the converter names what (tested by the equivalence matrix)
    back = f.read(f.config(held, {}), family)
    for dim in DIMENSIONS:
        assert getattr(back, dim) == getattr(held, dim), f"{family}: {dim} not read back from its config"
