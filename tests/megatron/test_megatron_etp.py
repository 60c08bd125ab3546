"""Experts at a tensor-parallel size of their own (`--etp` != `--tp`), proven by megatron-core
0.16.1 built at that expert TP (`initialize_model_parallel(expert_tensor_parallel_size=...)`):

- `torch` format, where Megatron-LM's rank-file names (TP and EP rank, no expert-TP rank) stay
  unambiguous, etp dividing tp: each rank of the job loads, strictly, the file its own
  `get_checkpoint_name` names, and the fp32 logits equal transformers' at default tolerance;
- `torch_dist` at any etp (etp > tp too): megatron-core's strict `dist_checkpointing.load` at
  that layout, the same logits, and `.metadata` equal to what its own save at that layout writes;
- both back to HF bitwise; and the rank files written are the (tp, ep) pairs megatron-core's
  rank generator gives the ranks of a job, for a matrix of layouts (no process group needed).

The default run holds one torch and two torch_dist cases in world 2; REFERENCE_EQUIVALENCE=1 adds
world-2 and world-4 layouts with shared experts, dense layers, tied heads and pipelines.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import tiny_spec
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared
from test_megatron_dist_write import _boxes, tied_scaled
from test_megatron_moe import DENSE_FIRST, FOUR

from reference.converters.megatron import MegatronLayout
from reference.converters.megatron import stage as S
from reference.converters.megatron.layout import check_experts
from reference.errors import InputError
from reference.tiny import SHAPE, logits, tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

GATE = os.environ.get("REFERENCE_EQUIVALENCE") == "1"


@dataclass(frozen=True)
class Case:
    family: str
    tie: bool
    fmt: str  # "torch" (loaded at the layout written) or "torch_dist" (loaded at tp/etp/ep/pp)
    tp: int
    etp: int
    ep: int
    pp: int = 1
    write: tuple[int, int, int] | None = None  # torch_dist: (tp, etp, ep) written, if not the loaded one
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    tag: str = ""

    @property
    def id(self) -> str:
        parts = [self.family, "tied" if self.tie else "untied", self.fmt,
                 f"tp{self.tp}etp{self.etp}ep{self.ep}pp{self.pp}"]
        parts += [f"written-{'x'.join(map(str, self.write))}"] if self.write else []
        return "-".join(parts + [self.tag] * bool(self.tag))

    def layout(self) -> MegatronLayout:
        tp, etp, ep = self.write or (self.tp, self.etp, self.ep)
        return MegatronLayout(tp=tp, etp=etp, ep=ep, pp=1 if self.write else self.pp, ckpt_format=self.fmt)


DEFAULT = [
    Case("mixtral", False, "torch", 2, 1, 2, overrides=FOUR),  # files mp_rank_00_000, mp_rank_01_001
    Case("qwen3_moe", False, "torch_dist", 2, 1, 2, overrides=FOUR),
    Case("mixtral", False, "torch_dist", 1, 2, 1, overrides=FOUR),  # expert TP above TP
]
MORE = [
    Case("qwen2_moe", False, "torch", 2, 1, 1, overrides=DENSE_FIRST, tag="dense0"),  # 2 files, no EP
    Case("qwen3_moe", True, "torch", 2, 1, 4, overrides=FOUR),  # 4 of the 8 (tp, ep) pairs
    Case("qwen2_moe", True, "torch", 2, 1, 2, pp=2, overrides=DENSE_FIRST, tag="dense0"),
    Case("mixtral", True, "torch_dist", 2, 1, 1, write=(1, 1, 1), overrides=FOUR),  # resharded on load
    Case("qwen2_moe", False, "torch_dist", 1, 2, 2, overrides=DENSE_FIRST, tag="dense0"),
    Case("qwen3_moe", False, "torch_dist", 2, 1, 2, pp=2, write=(2, 2, 1), overrides=FOUR),
]
CASES = DEFAULT + MORE * GATE


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """root/hf-ID (the HF model), root/ID (ours) and root/ID.ref.pt (HF logits)."""
    from reference.converters import convert

    root = tmp_path_factory.mktemp("etp")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(7))
    for case in CASES:
        model = tied_scaled(case.family, case.tie, **case.overrides)
        model.save_pretrained(root / f"hf-{case.id}")
        convert(root / f"hf-{case.id}", root / case.id, to="megatron", layout=case.layout())
        torch.save({"input_ids": ids, "logits": logits(model, ids)}, root / f"{case.id}.ref.pt")
    return root


@pytest.fixture(scope="module")
def loaded(written, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per case: errors from any rank, whether a last stage compared the logits. torch_dist cases
    are saved again by megatron-core into root/ID.mcore (`resave`)."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_dist_ranks import load_case
    from mcore_ranks import run_cases

    base = [{**asdict(c), "id": c.id, "ref": str(written / f"{c.id}.ref.pt"), "vpp": None, "te": False}
            for c in CASES]
    legacy = [{**r, "dir": str(written / r["id"])} for r in base if r["fmt"] == "torch"]
    dist = [{**r, "dist": str(written / r["id"]), "resave": str(written / f"{r['id']}.mcore")}
            for r in base if r["fmt"] == "torch_dist"]
    return {**run_cases(legacy, tmp_path_factory.mktemp("legacy")),
            **run_cases(dist, tmp_path_factory.mktemp("dist"), load_case)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_megatron_core_at_that_expert_tp_loads_strictly_and_logits_equal_hf(case: Case, loaded) -> None:
    assert_compared(loaded[case.id])


DIST = [c for c in CASES if c.fmt == "torch_dist" and not c.write]  # saved at the layout megatron-core loads


@pytest.mark.parametrize("case", DIST, ids=lambda c: c.id)
def test_dist_metadata_is_what_megatron_cores_save_at_that_expert_tp_writes(case: Case, written,
                                                                             loaded) -> None:
    """Every key, global shape, dtype and chunk (the experts' boxes cut by etp, not tp)."""
    assert_compared(loaded[case.id])
    ours = _boxes(written / case.id / "iter_0000001")
    theirs = _boxes(written / f"{case.id}.mcore" / "iter_0000001")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key
    # one box per expert-TP piece of each routed expert of each mixture layer (dense0: 3 of 4)
    boxes = sum(len(v[2]) for k, v in ours.items() if k.endswith("experts.experts.linear_fc2.weight"))
    assert boxes == (4 - (case.tag == "dense0")) * 4 * case.etp


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_back_to_hf_is_bitwise(case: Case, written, tmp_path) -> None:
    assert_back_to_hf_bitwise(written / case.id, written / f"hf-{case.id}", tmp_path / "back", case.family)


def test_torch_rank_files_are_the_pairs_megatron_cores_ranks_load(written) -> None:
    """The directories written are those of S.rank_files: TP 2, etp 1, EP 2 is two files."""
    case = DEFAULT[0]
    names = sorted(p.name for p in (written / case.id / "iter_0000001").iterdir())
    assert names == ["mp_rank_00_000", "mp_rank_01_001"]


@pytest.mark.parametrize(("tp", "etp", "ep", "pp"), [
    (1, 1, 1, 1), (2, 2, 2, 1), (2, 1, 2, 1), (2, 1, 1, 2), (2, 1, 4, 1), (4, 2, 2, 2), (4, 1, 2, 1),
    (4, 2, 1, 1), (2, 1, 3, 1), (6, 2, 2, 1), (4, 1, 4, 2)])
def test_rank_files_follow_megatron_cores_rank_generator(tp: int, etp: int, ep: int, pp: int) -> None:
    """For every global rank of the smallest job at the layout (and of one twice its size),
    megatron-core's own RankGenerator (order "tp-cp-ep-dp-pp", as initialize_model_parallel
    builds them) gives its TP, EP and expert-TP ranks; the set of (tp, ep, etp) they load is
    S.rank_files, and (etp dividing tp) no two ranks with one file name hold different experts."""
    import math

    from megatron.core.parallel_state import RankGenerator

    order = "tp-cp-ep-dp-pp"
    for world in (math.lcm(tp, etp * ep) * pp, 2 * math.lcm(tp, etp * ep) * pp):
        dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order=order)
        expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order=order)

        def rank_in(groups: list[list[int]], r: int) -> int:
            return next(g.index(r) for g in groups if r in g)

        held: dict[tuple[int, int, int], int] = {}
        for r in range(world):
            t, e = rank_in(dense.get_ranks("tp"), r), rank_in(expert.get_ranks("ep"), r)
            p, a = rank_in(dense.get_ranks("pp"), r), rank_in(expert.get_ranks("tp"), r)
            assert held.setdefault((t, e, p), a) == a, (t, e, p)  # one file name, one expert piece
        assert sorted(held) == sorted((t, e, p) for t, e, _ in S.rank_files(tp, etp, ep) for p in range(pp))
        assert {(t, e, a) for (t, e, _), a in held.items()} == set(S.rank_files(tp, etp, ep))


def test_torch_format_refuses_expert_tp_not_dividing_tp() -> None:
    """etp 2 at tp 1: ranks 0 and 1 (expert-TP ranks 0 and 1, both TP rank 0) would both save
    mp_rank_00; torch_dist takes it."""
    spec = tiny_spec("qwen3_moe", False)
    with pytest.raises(InputError, match="--etp 2 does not divide --tp 1: .* use --ckpt-format torch_dist"):
        check_experts(spec, MegatronLayout(etp=2))
    check_experts(spec, MegatronLayout(etp=2, ckpt_format="torch_dist"))



def test_expert_copies_that_differ_between_files_are_refused(tmp_path) -> None:
    """TP 2, etp 1: both files hold the whole experts (expert-TP rank 0); the reader takes
    mp_rank_00's and refuses, naming the file and key, a copy in mp_rank_01 that differs."""
    from reference.converters import convert
    from reference.converters.source import open_source

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mg", to="megatron", layout=MegatronLayout(tp=2, etp=1))
    path = tmp_path / "mg" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    key = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    full = state["model"][key]
    assert list(full.shape) == [SHAPE["hidden_size"], 32]  # not cut: the expert's whole width
    state["model"][key] = full + 1e-3
    torch.save(state, path)
    source = open_source(tmp_path / "mg")
    with pytest.raises(InputError, match=f"mp_rank_01/model_optim_rng.pt: model '{key}' differs from its "
                                         "copy in mp_rank_00"):
        for lazy in source.tensors.values():
            lazy.load()
