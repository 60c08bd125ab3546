"""HF -> Megatron against megatron-core 0.16.1 itself, and back to HF bitwise.

Every case converts a tiny HF model, loads each rank file into the real GPTModel with
`strict=True` (TP x PP ranks under gloo on the CPU, see mcore_ranks.py) and compares the
gathered fp32 logits with the HF model's at torch.testing.assert_close's default tolerance.
Shapes: 2 query groups of 8 heads and 4 groups of 2 (groups == tp at tp 2 and 4), head_dim
!= hidden / heads, tied and untied, vocabulary 250 (no multiple of 128). One process group
per world size runs all its cases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import MEGATRON_FAMILIES
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared

from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.tiny import SHAPE, logits, tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")  # one worker: the groups share the fixture

SHAPES: dict[str, dict[str, Any]] = {
    "g2x8": {"num_attention_heads": 16, "num_key_value_heads": 2, "hidden_size": 64, "head_dim": 8,
             "intermediate_size": 96, "num_hidden_layers": 4},
    "g4x2": {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 48, "head_dim": 12,
             "intermediate_size": 64, "num_hidden_layers": 4},
}
LAYOUTS = [(1, 1, None), (2, 1, None), (4, 1, None), (1, 2, None), (2, 2, None), (4, 2, None),
           (1, 2, 2), (2, 2, 2)]
FAMILY_NAMES = MEGATRON_FAMILIES
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Case:
    family: str
    tie: bool
    shape: str
    tp: int
    pp: int
    vpp: int | None = None
    te: bool = False
    pp_layers: tuple[int, ...] | None = None
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    tag: str = ""

    @property
    def id(self) -> str:
        parts = [self.family, "tied" if self.tie else "untied", self.shape, f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"vpp{self.vpp}"] * bool(self.vpp) + ["te"] * self.te + [self.tag] * bool(self.tag)
        if self.pp_layers:
            parts.append("layers" + "-".join(map(str, self.pp_layers)))
        return "-".join(parts)

    def layout(self) -> MegatronLayout:
        return MegatronLayout(tp=self.tp, pp=self.pp, vpp=self.vpp, layer_spec="te" if self.te else "local",
                              pp_layers=self.pp_layers)

    def model_overrides(self) -> dict[str, Any]:
        return {**SHAPES[self.shape], **self.overrides}


def _matrix() -> list[Case]:
    out = []
    for i, (tp, pp, vpp) in enumerate(LAYOUTS):
        for j, family in enumerate(FAMILY_NAMES):
            shape = "g4x2" if tp == 4 else ("g2x8", "g4x2")[(i // 2 + j) % 2]  # 2 groups cannot take tp 4
            out.append(Case(family, bool((i + j) % 2), shape, tp, pp, vpp))
    out += [
        Case("llama", False, "g2x8", 2, 2, te=True),
        Case("qwen3", True, "g4x2", 1, 2, 2, te=True),
        Case("qwen2", True, "g2x8", 2, 2, pp_layers=(1, 3)),
        Case("llama", False, "g4x2", 2, 2, overrides={"attention_bias": True}, tag="bias"),
        Case("llama", True, "g2x8", 2, 1, overrides={"rope_parameters": LLAMA3_ROPE}, tag="llama3rope"),
        Case("phi3", False, "g4x2", 2, 2, tag="rotary0.5",
             overrides={"hidden_size": 96, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 0.5}}),
    ]
    return out


CASES = _matrix()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """Every case converted to Megatron (root/ID), with its HF source (root/hf-ID) and the HF
    model's logits (root/ID.ref.pt) beside it."""
    root = tmp_path_factory.mktemp("mcore")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(7))
    for case in CASES:
        hf = root / f"hf-{case.id}"
        model = tiny_model(case.family, tie=case.tie, **case.model_overrides())
        if case.tie:
            # fill() draws embeddings 4x larger than heads; as a head they would make logits 4x
            # larger, and with them the fp32 noise of megatron's row-parallel partial sums (TP > 1
            # reorders additions; at TP 1 the logits are bitwise equal). Same scale as an untied head.
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(2 * model.config.hidden_size ** -0.5)
        model.save_pretrained(hf)
        convert(hf, root / case.id, to="megatron", layout=case.layout())
        torch.save({"input_ids": ids, "logits": logits(model, ids)}, root / f"{case.id}.ref.pt")
    return root


@pytest.fixture(scope="module")
def mcore_results(converted, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per case: errors from any rank, and whether a last-stage rank compared the logits."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_ranks import run_cases

    work = tmp_path_factory.mktemp("ranks")
    records = [{**asdict(c), "id": c.id, "dir": str(converted / c.id),
                "ref": str(converted / f"{c.id}.ref.pt")} for c in CASES]
    return run_cases(records, work)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_megatron_core_logits_equal_hf(case: Case, mcore_results) -> None:
    result = mcore_results[case.id]
    assert_compared(result)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_back_to_hf_is_bitwise(case: Case, converted, tmp_path) -> None:
    hf, back = converted / f"hf-{case.id}", tmp_path / "back"
    assert_back_to_hf_bitwise(converted / case.id, hf, back, case.family)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rank_files_hold_each_tensor_alone(case: Case, converted) -> None:
    """torch.save writes a tensor's whole storage: every piece must own exactly its bytes (the
    writer keeps pieces it cut afresh and copies views of the source), or a rank file would
    carry a whole source tensor, or a whole source file, per piece."""
    files = sorted((converted / case.id).rglob("model_optim_rng.pt"))
    assert len(files) == case.layout().tp * case.layout().pp
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)  # a plain, unmapped load
        seen: set[int] = set()
        for name, model in state.items():
            if not name.startswith("model"):
                continue
            for key, t in model.items():
                if not isinstance(t, torch.Tensor):
                    continue
                store = t.untyped_storage()
                assert (t.storage_offset(), store.nbytes()) == (0, t.nbytes), f"{path}: {key}"
                assert store.data_ptr() not in seen or t.nbytes == 0, f"{path}: {key} shares storage"
                seen.add(store.data_ptr())
