"""DeepSeek-V2/V3 to megatron-core's multi-latent attention and DeepSeek routing (local spec,
legacy `torch` format) and back: the real megatron-core GPTModel (MLASelfAttention,
TopKRouter with sigmoid scores, expert_bias, groups and scaling, ungated shared experts, dense
first layers) loads every rank file strictly under gloo on the CPU at TP 1 / TP 2 / EP 2, and its
gathered fp32 logits equal transformers' DeepseekV2/V3ForCausalLM (eager experts loop) at
assert_close's default tolerance; HF -> Megatron -> HF is bitwise, config.json too. Routing
is checked to differ between tokens, and V3's choice bias to change the choice, so that a
dropped bias or a wrong router cannot pass.

What megatron-core computes otherwise (V2's group score, a best expert, beside a top_k that
megatron-core sums two of; latent norms of another eps; rope on halves) is refused by name.

The default run holds two world-2 cases, one process group; REFERENCE_EQUIVALENCE=1 adds the rest.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import fails, read_tensors
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared

from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.converters.megatron.args import routing_refusal, spec_from_args
from reference.families.registry import FAMILIES
from reference.tiny import SHAPE, logits, tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

FULL = os.environ.get("REFERENCE_EQUIVALENCE") == "1"
# megatron-core's latent norms take the model's eps: DeepSeek's configs have rms_norm_eps 1e-6,
# the latent norms' eps in transformers. 3 layers: a dense first layer, then two mixtures.
BASE = {"rms_norm_eps": 1e-6, "num_hidden_layers": 3}
V2_LITE = {**BASE, "q_lora_rank": None}  # one q projection (V2-Lite), greedy softmax routing
V2_GROUPED = {**BASE, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 2,
              "routed_scaling_factor": 1.5}  # top_k // topk_group = 1: a group's best expert
# top_k // topk_group = 2: a group's best two experts, the 2 best of 4 groups of 2
V3_GROUPED = {**BASE, "n_routed_experts": 8, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707}  # V3: 1.0, 1.0


@dataclass(frozen=True)
class Case:
    family: str
    tp: int
    ep: int
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    tag: str = ""
    tie: bool = False
    pp: int = 1

    @property
    def id(self) -> str:
        parts = [self.family, f"tp{self.tp}", f"ep{self.ep}"] + [f"pp{self.pp}"] * (self.pp > 1)
        return "-".join(parts + [self.tag] * bool(self.tag))

    def layout(self) -> MegatronLayout:
        return MegatronLayout(tp=self.tp, ep=self.ep, pp=self.pp)


DEFAULT = [Case("deepseek_v3", 2, 1, BASE), Case("deepseek_v2", 1, 2, V2_LITE, "lite")]
GATE = [
    Case("deepseek_v3", 1, 1, BASE),
    Case("deepseek_v2", 2, 1, BASE),
    Case("deepseek_v3", 1, 2, V3_GROUPED, "grouped"),
    Case("deepseek_v2", 2, 1, V2_GROUPED, "grouped"),
    Case("deepseek_v3", 2, 2, {**BASE, "tie_word_embeddings": True}, "tied", tie=True),
    Case("deepseek_v3", 2, 1, {**BASE, "rope_parameters": YARN}, "yarn"),
    Case("deepseek_v2", 1, 1, {**BASE, "num_hidden_layers": 4}, pp=2),  # a mixture on each stage
    Case("deepseek_v3", 1, 1, {**BASE, "num_hidden_layers": 4, "tie_word_embeddings": True}, "tied",
         tie=True, pp=2),
]
CASES = DEFAULT + GATE * FULL


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("TopkRouter")]


def routed(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each MoE layer's (router logits, chosen experts) per token, from transformers' routers."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append((out[0], out[2])))
             for m in routers(model)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def deepseek(case: Case) -> torch.nn.Module:
    """The tiny model, V3's choice bias set nonzero (a buffer: `fill` leaves it at zero)."""
    model = tiny_model(case.family, tie=case.tie, **case.overrides)
    for i, router in enumerate(routers(model)):
        if hasattr(router, "e_score_correction_bias"):
            g = torch.Generator().manual_seed(100 + i)
            router.e_score_correction_bias.copy_(0.3 * torch.randn(router.num_experts, generator=g))
    if case.tie:  # as test_megatron_equivalence.py: a tied head at an untied head's scale
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(2 * model.config.hidden_size ** -0.5)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mla")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(7))
    for case in CASES:
        model = deepseek(case)
        layers = routed(model, ids)
        assert len(layers) >= 2, "want mixture layers after the dense first one"
        for router, (scores, chosen) in zip(routers(model), layers, strict=True):
            assert chosen.unique().numel() > 1, chosen  # the routing matters: several experts,
            assert len({tuple(sorted(row.tolist())) for row in chosen}) > 1, chosen  # per token
            bias = getattr(router, "e_score_correction_bias", None)
            if bias is not None:  # V3: the bias changes the choice, and so do groups where there are
                unbiased = scores.sigmoid().topk(router.top_k, dim=-1)[1]
                ungrouped = (scores.sigmoid() + bias).topk(router.top_k, dim=-1)[1]
                other = unbiased if router.num_group == 1 else ungrouped
                assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(chosen, other, strict=True))
        model.save_pretrained(root / f"hf-{case.id}")
        convert(root / f"hf-{case.id}", root / case.id, to="megatron", layout=case.layout())
        torch.save({"input_ids": ids, "logits": logits(model, ids)}, root / f"{case.id}.ref.pt")
    return root


@pytest.fixture(scope="module")
def mcore_results(converted, tmp_path_factory) -> dict[str, dict[str, Any]]:
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_ranks import run_cases

    work = tmp_path_factory.mktemp("ranks")
    records = [{**asdict(c), "vpp": None, "id": c.id, "dir": str(converted / c.id),
                "ref": str(converted / f"{c.id}.ref.pt"), "te": False} for c in CASES]
    return run_cases(records, work)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_megatron_core_mla_logits_equal_hf(case: Case, mcore_results) -> None:
    result = mcore_results[case.id]
    assert_compared(result)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mla_back_to_hf_is_bitwise(case: Case, converted, tmp_path) -> None:
    hf, back = converted / f"hf-{case.id}", tmp_path / "back"
    assert_back_to_hf_bitwise(converted / case.id, hf, back, case.family)


def test_mla_rank_files_hold_megatron_cores_names_and_shapes(tmp_path) -> None:
    """Keys, shapes and dtypes of each TP 2 rank file: the down projections cut by rows like
    the up projections (column-parallel in the local spec), expert_bias float32 and whole."""
    hf, mg = tmp_path / "hf", tmp_path / "mg"
    model = deepseek(Case("deepseek_v3", 2, 1, BASE))
    model.save_pretrained(hf)
    convert(hf, mg, to="megatron", layout=MegatronLayout(tp=2))
    sd = model.state_dict()
    for r in range(2):
        state = torch.load(mg / "iter_0000001" / f"mp_rank_0{r}" / "model_optim_rng.pt", weights_only=False)
        args, got = state["args"], state["model"]
        assert (args.multi_latent_attention, args.q_lora_rank, args.kv_lora_rank, args.qk_head_dim,
                args.qk_pos_emb_head_dim, args.v_head_dim, args.qk_layernorm, args.rope_type) == (
            True, 24, 16, 8, 8, 16, True, "rope")
        at = "decoder.layers.1.self_attention."
        hf = "model.layers.1.self_attn."
        for key, hf_key in (("linear_q_down_proj", "q_a_proj"), ("linear_q_up_proj", "q_b_proj"),
                            ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
                            ("linear_kv_up_proj", "kv_b_proj")):
            assert torch.equal(got[at + key + ".weight"], sd[hf + hf_key + ".weight"].chunk(2)[r])
            assert got[at + key + "._extra_state"] is None
        assert torch.equal(got[at + "linear_proj.weight"], sd[hf + "o_proj.weight"].chunk(2, 1)[r])
        assert torch.equal(got[at + "kv_layernorm.weight"], sd[hf + "kv_a_layernorm.weight"])
        bias = got["decoder.layers.2.mlp.router.expert_bias"]
        assert bias.dtype == torch.float32
        assert torch.equal(bias, sd["model.layers.2.mlp.gate.e_score_correction_bias"])
        assert "decoder.layers.0.mlp.linear_fc1.weight" in got  # the dense first layer
        assert "decoder.layers.1.mlp.shared_experts.gate_weight" not in got  # DeepSeek's: ungated
        assert not any("linear_qkv" in k for k in got)


def test_expert_bias_stays_float32_in_a_bfloat16_checkpoint(tmp_path) -> None:
    """megatron-core keeps expert_bias in float32 (it saves and loads it so): a bf16 conversion
    writes it in float32, the reader takes it so, and the way back holds the same values."""
    hf, mg = tmp_path / "hf", tmp_path / "mg"
    model = deepseek(Case("deepseek_v3", 2, 1, BASE))
    model.save_pretrained(hf)
    convert(hf, mg, to="megatron", layout=MegatronLayout(tp=2), dtype="bfloat16")
    got = torch.load(mg / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)["model"]
    assert got["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    bias = got["decoder.layers.1.mlp.router.expert_bias"]
    assert bias.dtype == torch.float32
    assert torch.equal(bias, model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"])
    convert(mg, tmp_path / "back", to="hf")
    back = read_tensors(tmp_path / "back")["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert back.dtype == torch.float32 and torch.equal(back, bias)


@pytest.mark.parametrize("layers,first_k", [(2, 1), (4, 3)])
def test_first_k_dense_layers_megatron_spells_as_a_layer_step_come_back(layers: int, first_k: int,
                                                                        tmp_path) -> None:
    """moe_layer_freq [0, 1] (or [0, 0, 0, 1]) reads as "a mixture every 2nd (4th) layer", the
    same layers as DeepSeek's first_k_dense_replace 1 (3): held, and written back as first k."""
    hf = tmp_path / "hf"
    deepseek(Case("deepseek_v3", 1, 1, {**BASE, "num_hidden_layers": layers,
                                        "first_k_dense_replace": first_k})).save_pretrained(hf)
    convert(hf, tmp_path / "mg", to="megatron")
    assert_back_to_hf_bitwise(tmp_path / "mg", hf, tmp_path / "back", "deepseek_v3")


@pytest.mark.parametrize("start,end", [((2, 1, 1), (1, 2, 2)), ((1, 2, 2), (2, 1, 1))],
                         ids=lambda lay: "x".join(map(str, lay)))
def test_mla_reshard_equals_direct_conversion(start, end, tmp_path) -> None:
    """Megatron (tp, pp, ep) -> Megatron (tp', pp', ep') writes the very files HF -> (tp', pp', ep') does."""
    from test_megatron_moe import assert_same_checkpoint

    hf = tmp_path / "hf"
    deepseek(Case("deepseek_v3", 1, 1, {**BASE, "num_hidden_layers": 4})).save_pretrained(hf)
    first, then = (MegatronLayout(tp=t, pp=p, ep=e) for t, p, e in (start, end))
    convert(hf, tmp_path / "a", to="megatron", layout=first)
    convert(tmp_path / "a", tmp_path / "resharded", to="megatron", layout=then)
    convert(hf, tmp_path / "direct", to="megatron", layout=then)
    assert_same_checkpoint(tmp_path / "resharded", tmp_path / "direct")


@pytest.mark.parametrize("family,overrides,needles", [
    # V2's group score is its best expert; megatron-core sums top_k // topk_group = 2 // 1 = 2
    ("deepseek_v2", {**BASE, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
     ("moe", "group_score='max'")),
    ("deepseek_v3", {**BASE, "n_group": 2, "topk_group": 2}, ("moe", "group_score='top2'")),  # 2 // 2 = 1
    # the latent norms' 1e-6 beside the model's 1e-5: megatron-core has one eps for both
    ("deepseek_v3", {**BASE, "rms_norm_eps": 1e-5}, ("norm_eps", "1e-05", "1e-06")),
    ("deepseek_v3", {**BASE, "rope_interleave": False}, ("interleaved_rope",)),
    ("deepseek_v3", {**BASE, "rope_parameters": {**YARN, "mscale_all_dim": 0.0}}, ("rope_parameters",)),
    ("deepseek_v3", {**BASE, "kv_lora_rank": 15}, ("--tp 2", "kv_lora_rank")),
], ids=["v2-group-max", "v3-top2-of-one", "latent-eps", "rope-halves", "yarn-mscale", "tp-latent"])
def test_what_megatron_core_computes_otherwise_is_refused_by_name(family, overrides, needles, tmp_path,
                                                                   capsys) -> None:
    hf = tmp_path / "hf"
    tiny_model(family, **overrides).save_pretrained(hf)
    out = tmp_path / "out"
    fails(capsys, ["convert", str(hf), str(out), "--to", "megatron", "--tp", "2"], *needles)
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_routing_predicate_is_exact_about_group_scores() -> None:
    """megatron-core's group score is the sum of a group's best top_k // group_topk: the spec's
    'max' where that is 1 and 'top2' where it is 2, nothing else."""
    spec = FAMILIES["deepseek_v3"].read(tiny_model("deepseek_v3", **V3_GROUPED).config.to_dict(), "v3")
    m = spec.moe
    assert (m.groups, m.top_groups, m.top_k, m.group_score) == (4, 2, 4, "top2")
    assert routing_refusal(m, 8) is None
    for top_groups, score, ok in ((2, "max", False), (4, "max", True), (4, "top2", False), (3, "max", True),
                                  (1, "top2", False)):  # 4 // 1 = 4: neither
        why = routing_refusal(m.__class__(**{**asdict(m), "top_groups": top_groups, "group_score": score}), 8)
        assert (why is None) == ok, (top_groups, score, why)
    sigmoid_unnormalised = m.__class__(**{**asdict(m), "norm_topk_prob": False})
    assert "norm_topk_prob=False" in routing_refusal(sigmoid_unnormalised, 8)


@pytest.mark.parametrize("changes,needle", [
    ({"moe_router_group_topk": 5}, "moe_router_group_topk=5"),  # top_k 4 // 5 = 0: no group score read
    ({"moe_router_num_groups": None}, "moe_router_num_groups=None"),  # group_topk without groups
    ({"moe_router_score_function": "sqrtsoftplus"}, "moe_router_score_function"),
    ({"moe_router_dtype": "fp64"}, "moe_router_dtype"),
    ({"qk_layernorm": False}, "qk_layernorm"),  # the local spec's latent norms are Identity then
    ({"rope_type": "mrope"}, "rope_type"),
    # MLA's softmax scale takes YaRN's mscale with plain rope too
    ({"rotary_scaling_factor": 40.0, "mscale_all_dim": 0.707}, "mscale_all_dim=0.707"),
], ids=["group-topk", "groups", "score", "router-dtype", "qk-layernorm", "rope-type", "rope-mscale"])
def test_megatron_mla_args_megatron_computes_otherwise_are_refused_by_name(changes, needle, tmp_path,
                                                                          capsys) -> None:
    hf, mg = tmp_path / "hf", tmp_path / "mg"
    tiny_model("deepseek_v3", **V3_GROUPED).save_pretrained(hf)
    convert(hf, mg, to="megatron", layout=MegatronLayout())
    path = mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    assert spec_from_args(state["args"], "x").moe.groups == 4
    for arg, value in changes.items():
        setattr(state["args"], arg, value)
    torch.save(state, path)
    fails(capsys, ["convert", str(mg), str(tmp_path / "back"), "--to", "hf"], needle, "mp_rank_00")
    assert not (tmp_path / "back").exists()

