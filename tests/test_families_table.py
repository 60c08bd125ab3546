"""`reference families` says what each target does with each family: its cells must agree with
what `convert` does."""

from __future__ import annotations

import pytest
from harness import BUILT, TARGETS, TIES, refused_by, tiny_spec

from reference.converters import convert
from reference.converters.megatron import MegatronLayout, MegatronTarget
from reference.errors import Inexpressible
from reference.families.cli import rows
from reference.families.registry import FAMILIES
from reference.families.resolve import as_loaded
from reference.families.spec import BIAS_KEYS
from reference.families.verdict import CLASS_DEFAULTS, class_defaults, typical, typical_config, verdict
from reference.tiny import save_tiny

REFUSED_CELLS = [(s, t) for s in BUILT for t in TARGETS
                 if verdict(FAMILIES[s], FAMILIES[t]).startswith("refused:")]


@pytest.mark.parametrize(("source", "target"), REFUSED_CELLS)
def test_a_refused_cell_means_every_checkpoint_is_refused(source: str, target: str) -> None:
    """'refused: X' is the family itself, not one config of it: its tiny model is refused too."""
    for tie in TIES:
        spec = tiny_spec(source, tie)
        assert set(refused_by(spec, target)) - set(BIAS_KEYS), (source, target, tie)


def test_the_table_has_refused_cells_to_check() -> None:
    assert ("qwen3", "llama") in REFUSED_CELLS and ("gemma2", "llama") in REFUSED_CELLS


def test_cells_name_the_blocking_feature() -> None:
    table = {r[0]: dict(zip(rows()[0], r, strict=True)) for r in rows()[1:]}
    assert table["qwen3"]["-> llama"] == "refused: qk_norm"
    assert table["gemma2"]["-> llama"].startswith("refused: post_norms")
    assert "attn_softcap" in table["gemma2"]["-> llama"]  # on in Gemma2Config's defaults
    # A window is a switch: Mistral's class defaults it on, its checkpoints often turn it off.
    assert table["mistral"]["-> llama"] == "exact; refused if it uses sliding_window"
    # Megatron-LM's gated MLP is SwiGLU: Gemma's tanh-GELU is refused by name, not by footnote.
    assert table["gemma"]["-> megatron"] == "refused: hidden_act"
    assert table["gemma"]["-> llama"].startswith("exact with folding")
    # DeepSeek's latent norms have eps 1e-6, as its configs' rms_norm_eps: one layernorm_epsilon
    # serves megatron-core (tests/megatron/test_megatron_mla.py converts them exactly)
    assert table["deepseek_v2"]["-> megatron"] == table["deepseek_v3"]["-> megatron"] == "exact"


def test_the_example_keeps_each_class_default_norm_eps() -> None:
    """The 7B example of `reference families` sets no eps: one eps for every family describes
    models some families never publish (a 1e-5 DeepSeek made megatron refuse it by norm_eps)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    classes = [f for f in FAMILIES.values() if f.model_type in CONFIG_MAPPING]
    for family in classes:
        default = family.read(as_loaded({"model_type": family.model_type}, family.model_type), "default")
        assert typical(family).norm_eps == default.norm_eps, family.model_type
    assert {typical(f).norm_eps for f in classes} >= {1e-5, 1e-6}  # the classes do differ


def test_gemma_to_megatron_is_refused_naming_the_activation(tmp_path) -> None:
    src = save_tiny("gemma", tmp_path / "src")
    with pytest.raises(Inexpressible) as e:
        convert(src, tmp_path / "dst", to="megatron")
    assert e.value.feature == "hidden_act" and "gelu_pytorch_tanh" in str(e.value)
    assert not (tmp_path / "dst").exists()


def test_rope_scaling_into_a_bare_base_layout_is_refused_before_writing(tmp_path) -> None:
    """InternLM2 and Baichuan store rope as a base: Llama-3 scaling has nowhere to go."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    src = save_tiny("llama", tmp_path / "src", rope_parameters=rope)
    assert FAMILIES["internlm2"].refuses(tiny_spec("llama", False).replace(rope_parameters=rope))
    with pytest.raises(Inexpressible) as e:
        convert(src, tmp_path / "dst", to="internlm2")
    assert e.value.feature == "rope_parameters" and "llama3" in str(e.value)
    assert not (tmp_path / "dst").exists()


def test_megatron_target_refuses_what_it_cannot_compute() -> None:
    target = MegatronTarget("llama", MegatronLayout())
    spec = tiny_spec("llama", False)
    assert target.refuses(spec) == {}
    assert list(target.refuses(spec.replace(hidden_act="gelu"))) == ["hidden_act"]
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    assert list(target.refuses(spec.replace(rope_parameters=yarn))) == ["rope_parameters"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stored_class_defaults_read_as_the_installed_transformers_fills_them_in(family: str) -> None:
    """`reference families` reads CLASS_DEFAULTS instead of importing the config classes."""
    assert family in class_defaults(), f"{family}: not in {CLASS_DEFAULTS}; run `nox -s goldens`"
    read = FAMILIES[family].read
    assert read(class_defaults()[family], family) == read(typical_config(family), family), (
        f"{CLASS_DEFAULTS} is stale for {family}; run `nox -s goldens`")
