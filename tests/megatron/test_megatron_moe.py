"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoE) to Megatron-Core's local
MoE spec and back: the real megatron-core GPTModel (SequentialMLP experts, TopKRouter, gated
shared expert) loads every rank file strictly under gloo on the CPU with expert, tensor or
pipeline parallelism, and its gathered fp32 logits equal transformers' (eager experts loop) at
assert_close's default tolerance; HF -> Megatron -> HF and Megatron -> Megatron resharding are
bitwise (GraniteMoE's multipliers are folded into the weights, so its way back is checked by
logits: dividing a multiplier out again is not bitwise). The routing is checked to differ
between tokens, so that a wrong router or a wrong expert numbering cannot pass.

The default run holds four world-2 cases (EP 2 twice, TP 2, PP 2), one process group; the
equivalence gate (REFERENCE_EQUIVALENCE=1, set by `nox -s equivalence`) adds the fuller matrix.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import fails
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from reference.cli import main
from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.tiny import SHAPE, logits, tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

FULL = os.environ.get("REFERENCE_EQUIVALENCE") == "1"
# 4 layers so that PP 2 puts MoE layers on both stages; a dense first layer for Qwen2-MoE.
FOUR = {"num_hidden_layers": 4}
DENSE_FIRST = {**FOUR, "mlp_only_layers": [0], "intermediate_size": 64}


@dataclass(frozen=True)
class Case:
    family: str
    tie: bool
    tp: int
    pp: int
    ep: int
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    tag: str = ""
    vpp: int | None = None

    @property
    def id(self) -> str:
        parts = [self.family, "tied" if self.tie else "untied", f"tp{self.tp}", f"pp{self.pp}",
                 f"ep{self.ep}"] + [f"vpp{self.vpp}"] * bool(self.vpp)
        return "-".join(parts + [self.tag] * bool(self.tag))

    def layout(self) -> MegatronLayout:
        return MegatronLayout(tp=self.tp, pp=self.pp, ep=self.ep, vpp=self.vpp)


DEFAULT = [
    Case("mixtral", False, 1, 1, 2, FOUR),
    Case("qwen2_moe", True, 2, 1, 1, DENSE_FIRST, "dense0"),
    Case("qwen3_moe", False, 1, 2, 1, FOUR),
    Case("granitemoe", True, 1, 1, 2, FOUR),  # experts stacked in HF, multipliers folded
]
GATE = [
    Case("granitemoe", False, 2, 1, 2, FOUR),
    Case("granitemoe", False, 1, 2, 2, FOUR),
    Case("qwen2_moe", False, 1, 1, 2, FOUR),
    Case("qwen3_moe", True, 1, 1, 2, FOUR),
    Case("mixtral", True, 2, 1, 1, FOUR),
    Case("qwen3_moe", False, 2, 1, 1, FOUR),
    Case("mixtral", False, 1, 2, 1, FOUR),
    Case("qwen2_moe", False, 1, 2, 1, DENSE_FIRST, "dense0"),
    Case("mixtral", False, 2, 1, 2, FOUR),
    Case("qwen2_moe", True, 2, 1, 2, DENSE_FIRST, "dense0"),
    Case("qwen3_moe", False, 1, 2, 2, FOUR),
    Case("qwen2_moe", False, 2, 2, 2, {**FOUR, "decoder_sparse_step": 2}, "step2"),
    Case("qwen3_moe", True, 1, 2, 2, FOUR, vpp=2),
    Case("qwen2_moe", False, 1, 2, 1, DENSE_FIRST, "dense0", vpp=2),
]
CASES = DEFAULT + GATE * FULL


def routed(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's top-k expert indices per token, (tokens, k), from transformers' routers."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))
             for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(7))
    for case in CASES:
        model = tiny_model(case.family, tie=case.tie, **case.overrides)
        if case.tie:  # as tests/megatron/test_megatron_equivalence.py: a head at an untied head's
            with torch.no_grad():  # scale, not fill()'s 4x larger embeddings (TP's fp32 noise grows with it)
                model.get_input_embeddings().weight.mul_(2 * model.config.hidden_size ** -0.5)
        layers = routed(model, ids)
        assert layers, "no router ran"
        for chosen in layers:  # the routing must matter: several experts, different per token
            assert chosen.unique().numel() > 1, chosen
            assert len({tuple(sorted(row.tolist())) for row in chosen}) > 1, chosen
        model.save_pretrained(root / f"hf-{case.id}")
        report = convert(root / f"hf-{case.id}", root / case.id, to="megatron", layout=case.layout())
        torch.save({"input_ids": ids, "logits": logits(model, ids), "folds": report.folds,
                    "caveats": report.caveats}, root / f"{case.id}.ref.pt")
    return root


@pytest.fixture(scope="module")
def mcore_results(converted, tmp_path_factory) -> dict[str, dict[str, Any]]:
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_ranks import run_cases

    work = tmp_path_factory.mktemp("ranks")
    records = [{**asdict(c), "id": c.id, "dir": str(converted / c.id),
                "ref": str(converted / f"{c.id}.ref.pt"), "te": False} for c in CASES]
    return run_cases(records, work)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_megatron_core_moe_logits_equal_hf(case: Case, mcore_results) -> None:
    result = mcore_results[case.id]
    assert_compared(result)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_moe_back_to_hf_is_bitwise_or_equal_where_folded(case: Case, converted, tmp_path) -> None:
    hf, back = converted / f"hf-{case.id}", tmp_path / "back"
    ref = torch.load(converted / f"{case.id}.ref.pt")
    if not ref["folds"]:
        assert_back_to_hf_bitwise(converted / case.id, hf, back, case.family)
        return
    report = convert(converted / case.id, back, to="hf")
    assert report.target == case.family and report.folds and not report.caveats
    config = [json.loads((d / "config.json").read_text()) for d in (hf, back)]
    if case.tie:  # the embedding's multiplier and the head's divisor fold apart: two tensors from then on
        assert any("untied" in c for c in ref["caveats"]) and not config[1]["tie_word_embeddings"]
        config[1]["tie_word_embeddings"] = True
    assert config[0] == config[1]
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager")
    torch.testing.assert_close(logits(model.eval(), ref["input_ids"]), ref["logits"])


def rank_files(root: Path) -> dict[str, dict[str, Any]]:
    """Every rank file of a checkpoint by its directory name."""
    paths = sorted(root.glob("iter_*/mp_rank_*/*.pt"))
    return {p.parent.name: torch.load(p, weights_only=False) for p in paths}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    fa, fb = rank_files(a), rank_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert vars(fa[name]["args"]) == vars(fb[name]["args"]), name
        ma, mb = fa[name]["model"], fb[name]["model"]
        assert sorted(ma) == sorted(mb), name
        for key in ma:
            if ma[key] is None:
                assert mb[key] is None, (name, key)
            else:
                assert torch.equal(ma[key], mb[key]) and ma[key].dtype == mb[key].dtype, (name, key)


@pytest.mark.parametrize("start,end", [((1, 1, 2), (2, 1, 1)), ((2, 1, 1), (1, 2, 2)),
                                       ((1, 2, 2), (2, 2, 1))], ids=lambda lay: "x".join(map(str, lay)))
def test_reshard_equals_direct_conversion(start, end, tmp_path) -> None:
    """Megatron (tp, pp, ep) -> Megatron (tp', pp', ep') writes the very files HF -> (tp', pp', ep') does."""
    hf = tmp_path / "hf"
    tiny_model("qwen2_moe", **DENSE_FIRST).save_pretrained(hf)
    first = MegatronLayout(tp=start[0], pp=start[1], ep=start[2])
    convert(hf, tmp_path / "a", to="megatron", layout=first)
    assert (tmp_path / "a" / "iter_0000001").is_dir()
    layout = MegatronLayout(tp=end[0], pp=end[1], ep=end[2])
    convert(tmp_path / "a", tmp_path / "resharded", to="megatron", layout=layout)
    convert(hf, tmp_path / "direct", to="megatron", layout=layout)
    assert_same_checkpoint(tmp_path / "resharded", tmp_path / "direct")


def test_expert_rank_directories_and_numbering(tmp_path) -> None:
    """EP rank e's file holds experts e*n/ep.. as local_experts.0..; names mp_rank_TT[_PPP]_EEE."""
    hf = tmp_path / "hf"
    model = tiny_model("mixtral", **FOUR)
    model.save_pretrained(hf)
    assert main(["convert", str(hf), str(tmp_path / "mg"), "--to", "megatron", "--tp", "2", "--pp", "2",
                 "--ep", "2"]) == 0
    files = rank_files(tmp_path / "mg")
    want = [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    assert sorted(files) == want
    args = files["mp_rank_00_000_000"]["args"]
    assert (args.num_experts, args.moe_router_topk, args.expert_model_parallel_size,
            args.expert_tensor_parallel_size, args.moe_router_pre_softmax) == (4, 2, 2, 2, False)
    w2 = model.state_dict()["model.layers.3.mlp.experts.down_proj"]  # (experts, hidden, size)
    for e in range(2):
        local = files[f"mp_rank_01_001_{e:03d}"]["model"]  # layer 3 is local layer 1 of stage 1
        experts = {k for k in local if ".local_experts." in k and k.endswith("weight")}
        assert {k.split(".")[6] for k in experts} == {"0", "1"}
        for j in range(2):
            piece = local[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight"]
            assert torch.equal(piece, w2[2 * e + j].chunk(2, dim=1)[1])


def test_bad_expert_layouts_fail_in_one_line(tmp_path, capsys) -> None:
    moe, dense = tmp_path / "moe", tmp_path / "dense"
    tiny_model("qwen3_moe").save_pretrained(moe)
    tiny_model("llama").save_pretrained(dense)
    out = tmp_path / "out"
    fails(capsys, ["convert", str(moe), str(out), "--to", "megatron", "--ep", "3"], "--ep 3", "num_experts 4")
    fails(capsys, ["convert", str(dense), str(out), "--to", "megatron", "--ep", "2"], "--ep 2", "no experts")
    # experts at expert TP 2 beside dense TP 1: two ranks would save the same mp_rank_00 file
    fails(capsys, ["convert", str(moe), str(out), "--to", "megatron", "--etp", "2"],
          "--etp 2 does not divide --tp 1", "torch_dist")
    fails(capsys, ["convert", str(moe), str(out), "--to", "qwen3_moe", "--ep", "2"], "--ep", "--to megatron")
    fails(capsys, ["convert", str(moe), str(out), "--to", "megatron", "--layer-spec", "te"],
          "--layer-spec te", "local spec only")
    # a router of 3 experts in a checkpoint whose config.json says 4
    bad = tmp_path / "bad"
    tiny_model("qwen3_moe").save_pretrained(bad)
    weights = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.gate.weight"
    weights[key] = weights[key][:3].clone()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    fails(capsys, ["convert", str(bad), str(out), "--to", "megatron", "--ep", "2"], key)
    assert not out.exists() and not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("arg,value", [("moe_router_enable_expert_bias", True),  # on softmax scores
                                       ("moe_router_num_groups", 2),  # without moe_router_group_topk
                                       ("moe_expert_capacity_factor", 1.0),
                                       ("moe_grouped_gemm", True)])
def test_routing_megatron_computes_differently_is_refused_by_name(arg, value, tmp_path, capsys) -> None:
    hf, mg = tmp_path / "hf", tmp_path / "mg"
    tiny_model("qwen3_moe").save_pretrained(hf)
    convert(hf, mg, to="megatron", layout=MegatronLayout(ep=2))
    for path in mg.glob("iter_*/mp_rank_*/*.pt"):
        state = torch.load(path, weights_only=False)
        setattr(state["args"], arg, value)
        torch.save(state, path)
    fails(capsys, ["convert", str(mg), str(tmp_path / "back"), "--to", "hf"], arg, "mp_rank_00_000")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("arg,value,field", [("moe_router_score_function", "sigmoid", "scoring='sigmoid'"),
                                             ("moe_router_topk_scaling_factor", 2.5, "scale=2.5")])
def test_deepseek_routing_args_read_and_a_family_without_it_refuses_by_name(arg, value, field, tmp_path,
                                                                            capsys) -> None:
    """DeepSeek's routing args are read (tests/megatron/test_megatron_mla.py runs them); a
    checkpoint recorded as Qwen3-MoE that routes so is refused by Qwen3-MoE, naming the field."""
    hf, mg = tmp_path / "hf", tmp_path / "mg"
    tiny_model("qwen3_moe").save_pretrained(hf)
    convert(hf, mg, to="megatron", layout=MegatronLayout())
    path = next(mg.glob("iter_*/mp_rank_*/*.pt"))
    state = torch.load(path, weights_only=False)
    setattr(state["args"], arg, value)
    torch.save(state, path)
    fails(capsys, ["convert", str(mg), str(tmp_path / "back"), "--to", "hf"], "qwen3_moe", "'moe'", field)
    assert not (tmp_path / "back").exists()


def test_damaged_expert_parallel_checkpoint_fails_in_one_line(tmp_path, capsys) -> None:
    hf, mg = tmp_path / "hf", tmp_path / "mg"
    tiny_model("mixtral").save_pretrained(hf)
    convert(hf, mg, to="megatron", layout=MegatronLayout(ep=2))
    other = mg / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = torch.load(other, weights_only=False)
    state["model"]["decoder.layers.0.self_attention.linear_proj.weight"].add_(1)
    torch.save(state, other)
    back = ["convert", str(mg), str(tmp_path / "back"), "--to", "hf"]
    fails(capsys, back, "mp_rank_00_001", "linear_proj", "differs")
    other.unlink()
    fails(capsys, back, "mp_rank_00_001", "missing rank file")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("field,value,refused", [
    ("choice_bias", True, True),  # megatron-core adds expert_bias to sigmoid scores only
    ("groups", 2, True),  # a group's best expert, where megatron-core sums top_k // top_groups = 2
    ("scoring", "sigmoid", False),  # renormalised, as norm_topk_prob with top_k 2 says
    ("scale", 2.5, False), ("fp32_router", True, False), ("gated_shared", False, False),
])
def test_deepseek_routing_fields_on_the_way_in(field, value, refused) -> None:
    """The spec's DeepSeek routing fields, one at a time on a routing megatron-core does match:
    those megatron-core computes otherwise are named; the rest it computes (moe_args)."""
    from reference.converters.megatron.args import refuses
    from reference.families.registry import FAMILIES

    config = tiny_model("qwen3_moe", norm_topk_prob=True).config.to_dict()
    spec = FAMILIES["qwen3_moe"].read(config, "qwen3_moe")
    assert "moe" not in refuses(spec)
    changed = spec.replace(moe=spec.moe.__class__(**{**asdict(spec.moe), field: value, "shared_size": 16}))
    if refused:
        assert f"{field}={value!r}" in refuses(changed)["moe"]
    else:
        assert "moe" not in refuses(changed)
