"""`reference verify` of mixtures of experts against a Megatron side run by megatron-core itself,
at the TP x PP x EP it was saved with (one rank per (tp, pp, ep), each loading its own
`mp_rank_TT[_PPP]_EEE` file strictly, or megatron-core's dist_checkpointing.load of torch_dist):
Mixtral, Qwen2-MoE (gated shared expert, a dense first layer), DeepSeek-V3 (latent attention,
sigmoid routing with a choice bias). A good conversion exits 0; one whose expert 3 (held by EP
rank 1) moved by 1e-3 exits 1, in full and with `--layers` reaching across pipeline stages.

The default run keeps a handful of world-2 runs (and one of world 4), forked from this process
but for one through the CLI; REFERENCE_EQUIVALENCE=1 adds the rest of the matrix.
"""

from __future__ import annotations

import os
import re
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_megatron_mla import BASE as DEEPSEEK
from test_megatron_mla import V2_LITE, deepseek
from test_megatron_mla import Case as MlaCase
from test_megatron_moe import DENSE_FIRST, FOUR
from test_verify import perturbed

from reference.cli import main
from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.tiny import tiny_model
from reference.verify.compare import report
from reference.verify.compare import verify as api_verify

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

FULL = os.environ.get("REFERENCE_EQUIVALENCE") == "1"
# HF models: (family, config overrides, the expert weight the bad copy moves by 1e-3: expert 3 of
# 4, which EP 2 puts on EP rank 1 as its local expert 1, in a layer of the second pipeline stage)
MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    "mixtral": ("mixtral", FOUR, "model.layers.2.block_sparse_moe.experts.3.w2.weight"),
    "qwen2_moe": ("qwen2_moe", DENSE_FIRST, "model.layers.2.mlp.experts.3.down_proj.weight"),
    "qwen3_moe": ("qwen3_moe", FOUR, "model.layers.2.mlp.experts.3.down_proj.weight"),
    "deepseek_v3": ("deepseek_v3", {**DEEPSEEK, "num_hidden_layers": 4},
                    "model.layers.2.mlp.experts.3.down_proj.weight"),
    "deepseek_v2": ("deepseek_v2", V2_LITE, "model.layers.2.mlp.experts.3.down_proj.weight"),
}


@dataclass(frozen=True)
class Case:
    model: str  # a key of MODELS
    layout: MegatronLayout = field(default_factory=MegatronLayout)
    layers: int | None = None  # verify --layers

    @property
    def id(self) -> str:
        lay = self.layout
        parts = [self.model, f"tp{lay.tp}", f"pp{lay.pp}", *[f"vpp{lay.vpp}"] * bool(lay.vpp), f"ep{lay.ep}"]
        parts += [f"etp{lay.etp}"] * (lay.etp is not None)
        parts += ["dist"] * (lay.ckpt_format == "torch_dist") + [f"layers{self.layers}"] * bool(self.layers)
        return "-".join(parts)

    @property
    def dir(self) -> str:
        """The converted checkpoint's directory name (the same for every --layers)."""
        return self.id.split("-layers")[0]


EP2 = MegatronLayout(ep=2)
ETP1 = MegatronLayout(tp=2, etp=1, ep=2)  # world 2: files mp_rank_00_000 and mp_rank_01_001
DEFAULT = [
    Case("mixtral", ETP1),
    Case("qwen2_moe", MegatronLayout(pp=2, ep=2)),  # world 4
    Case("qwen2_moe", MegatronLayout(pp=2, ep=2), layers=3),  # layer 3 on stage 1: TP x EP ranks
    Case("deepseek_v3", EP2),
    Case("mixtral", MegatronLayout(ep=2, ckpt_format="torch_dist")),
    Case("deepseek_v3", MegatronLayout(ep=2, ckpt_format="torch_dist")),
]
GATE = [
    Case("deepseek_v2", MegatronLayout(tp=2, ckpt_format="torch_dist")),
    Case("qwen3_moe", MegatronLayout(tp=2, ep=2)),
    Case("qwen3_moe", MegatronLayout(tp=2, ep=2), layers=2),
    Case("mixtral", MegatronLayout(tp=2, pp=2, ep=2)),  # world 8
    Case("mixtral", MegatronLayout(pp=2, ep=2), layers=4),
    Case("deepseek_v3", MegatronLayout(tp=2, ep=2)),
    Case("deepseek_v3", MegatronLayout(pp=2, ep=2), layers=3),
    Case("deepseek_v2", EP2),
    Case("deepseek_v2", MegatronLayout(tp=2)),
    Case("qwen2_moe", MegatronLayout(tp=2, ckpt_format="torch_dist")),
    Case("qwen3_moe", MegatronLayout(pp=2, ep=2, ckpt_format="torch_dist"), layers=3),
    Case("qwen3_moe", MegatronLayout(pp=2, vpp=2, ep=2)),  # world 4, a layer per virtual stage
    Case("qwen2_moe", MegatronLayout(pp=2, vpp=2, ep=2), layers=3),
    Case("qwen3_moe", MegatronLayout(etp=2, ckpt_format="torch_dist")),  # world 2, expert TP above TP
    Case("qwen2_moe", MegatronLayout(tp=2, etp=1, pp=2, ep=2), layers=3),  # world 4
    Case("deepseek_v3", MegatronLayout(tp=2, etp=1, ep=2, ckpt_format="torch_dist")),
]
CASES = DEFAULT + GATE * FULL
BAD = {Case("mixtral", EP2).dir, Case("mixtral", MegatronLayout(ep=2, ckpt_format="torch_dist")).dir,
       Case("qwen2_moe", MegatronLayout(pp=2, ep=2)).dir, Case("mixtral", ETP1).dir}


def hf_model(name: str, out: Path) -> None:
    family, overrides, _ = MODELS[name]
    if family.startswith("deepseek"):  # V3's choice bias nonzero, as in test_megatron_mla
        deepseek(MlaCase(family, 1, 1, overrides)).save_pretrained(out)
    else:
        tiny_model(family, **overrides).save_pretrained(out)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """root/hf-M for every model M; root/D for every case's checkpoint D, converted from it, and
    root/D-bad from root/hf-M-bad (M's expert 3 moved by 1e-3) where D is in BAD."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)

    root = tmp_path_factory.mktemp("verify-moe")
    dirs = {c.dir: c for c in [*CASES, Case("mixtral", EP2)]}
    for name in sorted({c.model for c in dirs.values()}):
        hf_model(name, root / f"hf-{name}")
        perturbed(root / f"hf-{name}", root / f"hf-{name}-bad", MODELS[name][2])
    for d, case in dirs.items():
        for tag in ("", "-bad") if d in BAD else ("",):
            convert(root / f"hf-{case.model}{tag}", root / f"{d}{tag}", to="megatron", layout=case.layout)
    return root


def verify(src: Path, dst: Path, **options: Any) -> tuple[int, str]:
    """Through the API, with forked ranks (megatron-core is imported here already)."""
    v = api_verify(src, dst, start_method="fork", **options)
    return (0 if v.ok else 1), "\n".join(report(v))


def beyond(out: str) -> float:
    """How many times the limit the printed difference is."""
    diff = float(re.search(r"max \|src - dst\| = (\S+?),?\s", out).group(1))
    return diff / float(re.search(r"limit 10 x floor = (\S+)", out).group(1))


def test_mixtral_at_ep_2_agrees_through_the_cli(ckpts, capsys) -> None:
    """Spawned ranks, as a user's are: one per EP rank, each with its own file."""
    capsys.readouterr()
    code = main(["verify", str(ckpts / "hf-mixtral"), str(ckpts / Case("mixtral", EP2).dir)])
    out = capsys.readouterr().out
    assert code == 0 and "OK: within the noise floor" in out, out
    assert "megatron-core GPTModel, torch tp 1 pp 1 ep 2" in out and "top-1 agreement 32/32" in out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_good_moe_conversion_agrees(case: Case, ckpts) -> None:
    code, out = verify(ckpts / f"hf-{case.model}", ckpts / case.dir, layers=case.layers)
    assert code == 0 and "OK: within the noise floor" in out, out
    lay = case.layout
    assert (f"{lay.ckpt_format} tp {lay.tp} pp {lay.pp}" + (f" vpp {lay.vpp}" if lay.vpp else "")
            + (f" ep {lay.ep}" if lay.ep > 1 else "") + (f" etp {lay.etp}" if lay.etp else "")) in out
    assert ("hidden states after layer" in out) == bool(case.layers)


@pytest.mark.parametrize("d", sorted(BAD))
def test_an_expert_of_ep_rank_1_moved_by_1e_3_is_beyond_the_floor(d: str, ckpts) -> None:
    """Only the file of EP rank 1 (or its box in torch_dist) differs from the good checkpoint."""
    model = d.split("-")[0]
    code, out = verify(ckpts / f"hf-{model}", ckpts / f"{d}-bad", tokens=16)
    assert code == 1 and "DIFFERENT" in out and "16 tokens" in out, out
    assert beyond(out) > 10, out  # not a near miss


def test_layers_see_the_moved_expert_only_once_they_reach_it(ckpts) -> None:
    """Expert 3 of layer 3 (index 2, on pipeline stage 1, EP rank 1) moved: `--layers 2` runs
    stage 0's files only and agrees; `--layers 3` assembles both stages' files of each EP rank."""
    bad = ckpts / f"{Case('qwen2_moe', MegatronLayout(pp=2, ep=2)).dir}-bad"
    code, out = verify(ckpts / "hf-qwen2_moe", bad, layers=2)
    assert code == 0 and "hidden states after layer 2" in out, out
    code, out = verify(ckpts / "hf-qwen2_moe", bad, layers=3)
    assert code == 1 and "hidden states after layer 3" in out and beyond(out) > 10, out


def test_what_the_converters_refuse_is_refused_by_name(tmp_path, capsys) -> None:
    """A torch-format checkpoint whose args put experts at expert TP 2 beside TP 1 (two ranks of
    one rank-file name would hold different expert pieces): one line, exit 2, nothing run."""
    import torch

    from reference.verify.mcore_model import check_args

    args = Namespace(swiglu=True, position_embedding_type="rope", multi_latent_attention=True,
                     num_experts=4, tensor_model_parallel_size=2, expert_tensor_parallel_size=1)
    check_args(args, "ckpt")  # latent attention and experts at an expert TP of their own: built
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mg", to="megatron")
    path = tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["args"].expert_tensor_parallel_size = 2
    torch.save(state, path)
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "hf"), str(tmp_path / "mg")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--etp 2 does not divide --tp 1" in err, err
