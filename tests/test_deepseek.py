"""DeepSeek-V2 and -V3 in the unified model (issue 14): multi-head latent attention and
DeepSeek's routing, equal to transformers' classes (eager experts) in fp32, and converted to
the unified format and back bitwise. The tiny rows (reference/tiny.py) cover q_lora_rank,
greedy routing, first_k_dense_replace=1 and tying through tests/test_unified.py; here, the
variants those rows do not reach."""

from __future__ import annotations

import json
import math

import pytest
import torch
from harness import assert_bitwise, read_tensors

from reference.converters import convert
from reference.errors import Inexpressible
from reference.modeling import UnifiedForCausalLM
from reference.modeling.mla import softmax_scale
from reference.modeling.moe import MoE
from reference.tiny import logits, tiny_model

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
        "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}
GROUPED = {"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}

VARIANTS = {
    "v2-one-q-projection": ("deepseek_v2", {"q_lora_rank": None}),  # V2-Lite's
    "v2-group-limited-3-layers": ("deepseek_v2", {**GROUPED, "topk_method": "group_limited_greedy",
                                                  "num_hidden_layers": 3, "routed_scaling_factor": 1.5}),
    "v2-yarn-two-shared": ("deepseek_v2", {"rope_parameters": YARN, "n_shared_experts": 2}),
    "v3-grouped-no-q-lora": ("deepseek_v3", {**GROUPED, "q_lora_rank": None}),
    "v3-halves-not-renormalised": ("deepseek_v3", {"rope_interleave": False, "norm_topk_prob": False}),
    "v3-yarn-3-layers-2-dense": ("deepseek_v3", {"rope_parameters": YARN, "num_hidden_layers": 3,
                                                 "first_k_dense_replace": 2}),
}


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 250, (2, length), generator=torch.Generator().manual_seed(length))


def _chosen(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each mixture layer's chosen experts (tokens, top_k) on a forward of `ids`."""
    chosen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: chosen.append(mod.route(args[0].flatten(0, 1))[0]))
             for m in model.modules() if isinstance(m, MoE)]
    logits(model, ids)
    for hook in hooks:
        hook.remove()
    return chosen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_load_exactly_and_convert_back_bitwise(variant: str, tmp_path) -> None:
    family, overrides = VARIANTS[variant]
    original = tiny_model(family, **overrides)
    original.save_pretrained(tmp_path / "src")
    ids = _ids(40)  # beyond YaRN's original 16 positions
    for backend in ("eager", "sdpa"):
        model = UnifiedForCausalLM.from_pretrained(tmp_path / "src", attn_implementation=backend)
        torch.testing.assert_close(logits(model, ids), logits(original, ids))
    for layer in _chosen(model, ids):
        assert layer.unique().numel() > 1
        assert len({tuple(sorted(row.tolist())) for row in layer}) > 1  # tokens route differently
    convert(tmp_path / "src", tmp_path / "unified", to="unified")
    convert(tmp_path / "unified", tmp_path / "back", to=family)
    assert_bitwise(read_tensors(tmp_path / "src"), read_tensors(tmp_path / "back"))
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "back")]
    assert config[0] == config[1]


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_group_limited_routing_keeps_to_the_best_groups(family: str, tmp_path) -> None:
    """4 groups of 2 experts, 2 groups kept: each token's 3 experts lie in at most 2 groups,
    and over the tokens more than 2 groups are used (the groups are chosen per token)."""
    extra = {"topk_method": "group_limited_greedy"} if family == "deepseek_v2" else {}
    tiny_model(family, **GROUPED, **extra).save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src")
    assert model.spec.moe.groups == 4 and model.spec.moe.top_groups == 2
    (layer,) = _chosen(model, _ids(40))
    groups = layer // 2
    assert all(len(set(row.tolist())) <= 2 for row in groups)
    assert groups.unique().numel() > 2


def test_v3_correction_bias_changes_the_choice_not_the_weights(tmp_path) -> None:
    original = tiny_model("deepseek_v3")
    gate = original.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    original.save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="eager")
    ids = _ids(40)
    torch.testing.assert_close(logits(model, ids), logits(original, ids))
    (biased,) = _chosen(model, ids)
    moe = model.layers[1].mlp
    moe.choice_bias = torch.zeros(4)
    (plain,) = _chosen(model, ids)
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(biased, plain, strict=True))
    convert(tmp_path / "src", tmp_path / "unified", to="unified")
    convert(tmp_path / "unified", tmp_path / "back", to="deepseek_v3")
    assert_bitwise(read_tensors(tmp_path / "src"), read_tensors(tmp_path / "back"))


def test_yarn_mscale_all_dim_scales_the_softmax(tmp_path) -> None:
    tiny_model("deepseek_v2", rope_parameters=YARN).save_pretrained(tmp_path / "src")
    spec = UnifiedForCausalLM.from_pretrained(tmp_path / "src").spec
    mscale = 0.1 * 0.707 * math.log(4.0) + 1.0  # YaRN's mscale of factor 4
    assert softmax_scale(spec) == pytest.approx(16 ** -0.5 * mscale**2, rel=1e-12)
    plain = spec.replace(rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert softmax_scale(plain) == 16 ** -0.5


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_greedy_generate_and_stream_with_left_padding_equal_transformers(family: str, tmp_path) -> None:
    original = tiny_model(family)
    original.save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="sdpa")
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :1] = 0, 0  # three prompts of 5, 8 and 9 tokens, padded on the left
    ids = ids.masked_fill(mask == 0, 0)
    args = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    want = original.generate(ids, **args)
    torch.testing.assert_close(model.generate(ids, **args), want, rtol=0, atol=0)
    streamed = list(model.stream_generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]))
    torch.testing.assert_close(torch.stack(streamed, dim=1), want[:, 9:], rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [{"norm_topk_prob": True}, {"moe_layer_freq": 2},
                                       {"attention_bias": True}],
                         ids=["norm_topk_prob", "moe_layer_freq", "attention_bias"])
def test_v2_fields_the_model_does_not_hold_are_refused_by_name(overrides: dict, tmp_path) -> None:
    from reference.errors import InputError

    tiny_model("deepseek_v2").save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, **overrides}))
    (name,) = overrides
    with pytest.raises(InputError, match=name):
        UnifiedForCausalLM.from_pretrained(tmp_path / "src")


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_llama_refuses_latent_attention_by_name_and_points_to_unified(family: str, tmp_path) -> None:
    tiny_model(family).save_pretrained(tmp_path / "src")
    with pytest.raises(Inexpressible) as e:
        convert(tmp_path / "src", tmp_path / "dst", to="llama")
    assert e.value.feature == "latent_attention" and "--to unified" in str(e.value)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_config_written_from_the_spec_reads_back_the_same(variant: str) -> None:
    """Without the source's config.json to copy, the family's config is written from the spec
    alone: its class must read the same spec from it."""
    from reference.families.registry import FAMILIES
    from reference.families.resolve import as_loaded
    from reference.tiny import tiny_config

    family, overrides = VARIANTS[variant]
    spec = FAMILIES[family].read(tiny_config(family, **overrides).to_dict(), family)
    written = as_loaded(FAMILIES[family].config(spec, {}), family)
    assert FAMILIES[family].read(written, family) == spec


_YARN_40 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1}
# Published config.json values, with 4 layers of the 27 / 61 (the layers repeat; meta is cheap,
# but 256 experts x 61 layers of modules are not).
PUBLISHED = {
    "DeepSeek-V2-Lite": {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
        "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "rope_scaling": {**_YARN_40, "mscale": 0.707, "mscale_all_dim": 0.707},
        "tie_word_embeddings": False},
    "DeepSeek-V3": {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "noaux_tc",
        "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "rope_scaling": {**_YARN_40, "mscale": 1.0, "mscale_all_dim": 1.0},
        "tie_word_embeddings": False},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_the_spec_holds_what_the_transformers_class_computes_at_real_size(name: str) -> None:
    """On the meta device, at published sizes: every attention and router tensor transformers
    has maps to a unified tensor of its shape, the experts agree in count and size, and the
    softmax scale (YaRN's mscale²) and rope frequencies are what the transformers modules hold."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from reference.families.registry import FAMILIES
    from reference.families.resolve import as_loaded
    from reference.modeling import UnifiedConfig
    from reference.modeling.rope import Rotary

    config = PUBLISHED[name]
    family = FAMILIES[config["model_type"]]
    spec = family.read(as_loaded(config, name), name)
    cfg = AutoConfig.for_model(**config)
    unified_config = UnifiedConfig.from_spec(spec)
    with torch.device("meta"):
        original = AutoModelForCausalLM.from_config(cfg)
        model = UnifiedForCausalLM(unified_config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fused = 0
    for key, tensor in original.state_dict().items():
        if ".mlp.experts." in key:  # in memory fused (E, ...): save_pretrained writes them per expert
            size, h = spec.moe.expert_size, spec.hidden_size  # gate_up_proj, down_proj
            assert tuple(tensor.shape) in ((spec.num_experts, 2 * size, h), (spec.num_experts, h, size)), key
            fused += 1
            continue
        (canonical,), _ = family.keys.canonical(key, name)
        assert ours.pop(canonical) == tuple(tensor.shape), key
    assert fused == 2 * sum(spec.moe.on(i) for i in range(spec.num_layers))
    assert all(".mlp.experts." in k for k in ours)  # nothing else of ours is left unmatched
    for theirs, block in zip(original.model.layers, model.layers, strict=True):
        assert theirs.self_attn.scaling == block.attn.scale != (128 + 64) ** -0.5
    rotary = type(original.model.rotary_emb)(config=cfg)
    torch.testing.assert_close(Rotary(unified_config).inv_freq, rotary.inv_freq, rtol=0, atol=0)
    assert Rotary(unified_config).scalings == [rotary.attention_scaling]
