"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) written by our one-process `torch_dist`
writer, proven by megatron-core 0.16.1 itself: its `dist_checkpointing.save` of the same MoE
GPTModel (local spec, SequentialMLP experts) records exactly our keys, global shapes, chunks and
dtypes, and its strict `dist_checkpointing.load` into MoE GPTModels at EP 2 and at TP 2 gives
fp32 logits equal to transformers' (eager experts loop) at assert_close's default tolerance;
and our torch_dist reader brings them back to HF bitwise.

Qwen2-MoE with a dense first layer covers megatron-core's per-layer keys (`moe_layer_freq` a
list); Mixtral and Qwen3-MoE its stacked ones. The default run holds one EP 2 and one TP 2
load; REFERENCE_EQUIVALENCE=1 adds the rest of the matrix.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared
from procs import spawn
from test_megatron_dist_write import (
    _boxes,
    assert_refused,
    assert_via_torch_writes_the_same_bytes,
    tied_scaled,
    write_cases,
)
from test_megatron_moe import DENSE_FIRST, FOUR

from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.tiny import tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

GATE = os.environ.get("REFERENCE_EQUIVALENCE") == "1"


@dataclass(frozen=True)
class Case:
    family: str
    tie: bool
    write: tuple[int, int, int]  # (tp, pp, ep) the conversion is asked for
    tp: int  # the layout megatron-core loads it at
    pp: int
    ep: int
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    tag: str = ""

    @property
    def id(self) -> str:
        w = "x".join(map(str, self.write))
        return "-".join([self.family, "tied" if self.tie else "untied", f"written-{w}",
                         f"loaded-tp{self.tp}pp{self.pp}ep{self.ep}"] + [self.tag] * bool(self.tag))


DEFAULT = [
    Case("mixtral", False, (1, 1, 2), 1, 1, 2, FOUR),  # stacked layers, experts over EP 2
    Case("qwen2_moe", True, (1, 1, 1), 2, 1, 1, DENSE_FIRST, "dense0"),  # per-layer keys, resharded to TP 2
]
MORE = [
    Case("qwen3_moe", False, (2, 1, 1), 1, 1, 2, FOUR),
    Case("qwen3_moe", True, (1, 1, 2), 2, 1, 1, FOUR),
    Case("mixtral", True, (2, 1, 1), 2, 1, 1, FOUR),
    Case("qwen2_moe", False, (1, 1, 2), 1, 1, 2, DENSE_FIRST, "dense0"),
    Case("qwen2_moe", False, (1, 1, 1), 1, 2, 2, {**FOUR, "decoder_sparse_step": 2}, "step2"),
    Case("mixtral", False, (1, 1, 1), 2, 1, 2, FOUR),
    Case("qwen3_moe", False, (2, 2, 2), 1, 2, 2, FOUR),
]
CASES = DEFAULT + MORE * GATE


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("distmoe"), CASES,
                       lambda c: tied_scaled(c.family, c.tie, **c.overrides))


@pytest.fixture(scope="module")
def loaded(written, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per case: errors from any rank, whether a last stage compared the logits."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_dist_ranks import load_case
    from mcore_ranks import run_cases

    records = [{**asdict(c), "id": c.id, "dist": str(written / c.id), "ref": str(written / f"{c.id}.ref.pt")}
               for c in CASES]
    return run_cases(records, tmp_path_factory.mktemp("ranks"), load_case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_megatron_core_loads_moe_strictly_and_logits_equal_hf(case: Case, loaded) -> None:
    result = loaded[case.id]
    assert_compared(result)


def test_moe_metadata_is_what_megatron_cores_save_writes(tmp_path) -> None:
    """Against megatron-core's own `dist_checkpointing.save` of the MoE GPTModel (loaded strictly
    from our legacy files): Qwen2-MoE (per-layer keys, a dense layer) at EP 2, Mixtral (stacked,
    routed experts as [L, E, ...]) at TP 2 and Qwen3-MoE (stacked, q/k norms) at EP 2: every
    key, global shape, dtype and chunk."""
    import megatron.core.models.gpt  # noqa: F401
    from mcore_ranks import save_dist_group

    records = []
    cases = (("qwen2_moe", DENSE_FIRST, MegatronLayout(ep=2)), ("mixtral", {"num_hidden_layers": 2},
                                                                 MegatronLayout(tp=2)),
             ("qwen3_moe", FOUR, MegatronLayout(ep=2)))
    for family, overrides, layout in cases:
        tiny_model(family, **overrides).save_pretrained(tmp_path / family / "hf")
        convert(tmp_path / family / "hf", tmp_path / family / "legacy", to="megatron", layout=layout)
        convert(tmp_path / family / "hf", tmp_path / family / "ours", to="megatron",
                layout=MegatronLayout(tp=layout.tp, ep=layout.ep, ckpt_format="torch_dist"))
        records.append({"dir": str(tmp_path / family / "legacy"), "dist": str(tmp_path / family / "mcore"),
                        "tp": layout.tp, "pp": 1, "ep": layout.ep, "vpp": None, "te": False})
    (tmp_path / "cases.json").write_text(json.dumps(records))
    spawn(save_dist_group, 2, str(tmp_path / "cases.json"), timeout_s=240, method="fork")
    for family, _, _ in cases:
        ours = _boxes(tmp_path / family / "ours" / "iter_0000001")
        theirs = _boxes(tmp_path / family / "mcore" / "iter_0000001")
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            assert ours[key] == theirs[key], key
    routed = _boxes(tmp_path / "mixtral" / "ours" / "iter_0000001")
    assert routed["decoder.layers.mlp.experts.experts.linear_fc2.weight"][0] == [2, 4, 72, 112]
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" in \
        _boxes(tmp_path / "qwen2_moe" / "ours" / "iter_0000001")


@pytest.mark.parametrize(("flags", "needles"), [
    (["--etp", "3"], ["--etp 3", "moe_ffn_hidden_size 32"]),
    (["--layer-spec", "te"], ["--layer-spec te"]),
    (["--ep", "3"], ["--ep 3", "num_experts 4"]),
])
def test_moe_refusals_are_one_line_and_write_nothing(tmp_path, capsys, flags, needles) -> None:
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "hf")
    assert_refused(tmp_path / "hf", capsys, flags, needles)


def test_torch_format_moe_to_torch_dist_writes_the_same_bytes_as_from_hf(tmp_path) -> None:
    """Megatron `torch` (TP 2 x EP 2) -> `torch_dist` writes the very .distcp file HF -> `torch_dist` does."""
    tiny_model("qwen2_moe", **DENSE_FIRST).save_pretrained(tmp_path / "hf")
    assert_via_torch_writes_the_same_bytes(tmp_path / "hf", tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_moe_back_to_hf_is_bitwise(case: Case, written, tmp_path) -> None:
    """HF -> our torch_dist -> HF (the torch_dist reader, dist.py): every tensor and the config."""
    hf, back = written / f"hf-{case.id}", tmp_path / "back"
    assert_back_to_hf_bitwise(written / case.id, hf, back, case.family)
