"""DeepSeek-V2/V3 (multi-latent attention, DeepSeek routing) written by our one-process
`torch_dist` writer and read back by our reader, proven by megatron-core 0.16.1 itself: its own
`dist_checkpointing.save` of the same MLA GPTModel (local spec) records exactly our keys, global
shapes, chunks and dtypes; its strict `dist_checkpointing.load` of ours into MLA GPTModels at
another TP/EP gives fp32 logits equal to transformers' at assert_close's default tolerance; HF ->
ours -> HF is bitwise; and its own save, which records no family, reads back to HF bitwise with
equal logits.

The local MLA layer spec has no keys map: unlike a dense layer's, its norms keep their local
names (`decoder.layers.input_layernorm.weight`). DeepSeek's dense first layer makes the layers
non-homogeneous (one key per layer); every layer a mixture stacks them (`[L, ...]`).
A `torch` checkpoint converted to `torch_dist` writes the bytes the HF model does.
The default run holds one EP 2 and one TP 2 load, one megatron-core save at TP 2 and at EP 2;
REFERENCE_EQUIVALENCE=1 adds the rest of the matrix.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import assert_bitwise, read_tensors
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared
from procs import spawn
from test_megatron_dist_write import (
    _boxes,
    assert_refused,
    assert_via_torch_writes_the_same_bytes,
    cli,
    write_cases,
)
from test_megatron_mla import BASE, V2_LITE, V3_GROUPED, YARN, deepseek
from test_megatron_mla import Case as MlaCase
from transformers import AutoModelForCausalLM

from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.tiny import SHAPE, logits

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

GATE = os.environ.get("REFERENCE_EQUIVALENCE") == "1"
STACKED = {**BASE, "first_k_dense_replace": 0}  # every layer a mixture: homogeneous, [L, ...] stacks


@dataclass(frozen=True)
class Case:
    family: str
    overrides: dict[str, Any] = field(hash=False)
    write: tuple[int, int, int]  # (tp, pp, ep) the conversion is asked for
    load: tuple[int, int, int]  # the layout megatron-core loads it at
    tag: str
    tie: bool = False

    @property
    def id(self) -> str:
        w, lo = ("x".join(map(str, t)) for t in (self.write, self.load))
        return f"{self.family}-{self.tag}-written-{w}-loaded-{lo}"

    def model(self) -> torch.nn.Module:
        """The tiny model (V3's choice bias nonzero, a tied head at an untied head's scale)."""
        return deepseek(MlaCase(self.family, 1, 1, self.overrides, tie=self.tie))


DEFAULT = [
    Case("deepseek_v3", BASE, (2, 1, 1), (1, 1, 2), "dense0"),  # per-layer keys, resharded to EP 2
    Case("deepseek_v2", V2_LITE, (1, 1, 2), (2, 1, 1), "lite"),  # one q projection, resharded to TP 2
]
MORE = [
    Case("deepseek_v2", BASE, (2, 1, 1), (2, 1, 1), "q-lora"),
    Case("deepseek_v3", STACKED, (1, 1, 1), (2, 1, 1), "stacked"),
    Case("deepseek_v3", V3_GROUPED, (1, 1, 2), (1, 1, 2), "grouped"),
    Case("deepseek_v2", {**V2_LITE, "num_hidden_layers": 4}, (2, 1, 1), (1, 2, 1), "lite-4-layers"),
    Case("deepseek_v3", {**BASE, "tie_word_embeddings": True}, (1, 1, 1), (2, 1, 1), "tied", tie=True),
    Case("deepseek_v3", {**BASE, "rope_parameters": YARN}, (2, 1, 2), (2, 1, 1), "yarn"),
]
CASES = DEFAULT + MORE * GATE

# megatron-core's own save, from our legacy files at (tp, ep), world 2 each: TP 2 with per-layer
# keys, TP 1 x EP 2 with one q projection; the gate adds TP 1 (and data parallel 2), the stacked
# layers at TP 2 and groups at EP 2.
SAVED = {"v3-dense0-tp2": ("deepseek_v3", BASE, 2, 1), "v2-lite-ep2": ("deepseek_v2", V2_LITE, 1, 2)}
if GATE:
    SAVED.update({"v2-q-lora-tp1": ("deepseek_v2", BASE, 1, 1),
                  "v3-stacked-tp2": ("deepseek_v3", STACKED, 2, 1),
                  "v3-grouped-ep2": ("deepseek_v3", V3_GROUPED, 1, 2)})


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("distmla"), CASES, lambda c: c.model())


@pytest.fixture(scope="module")
def loaded(written, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per case: errors from any rank, whether a last stage compared the logits."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_dist_ranks import load_case
    from mcore_ranks import run_cases

    records = [{**asdict(c), "tp": c.load[0], "pp": c.load[1], "ep": c.load[2], "id": c.id,
                "dist": str(written / c.id), "ref": str(written / f"{c.id}.ref.pt")} for c in CASES]
    return run_cases(records, tmp_path_factory.mktemp("ranks"), load_case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_megatron_core_loads_mla_strictly_and_logits_equal_hf(case: Case, loaded) -> None:
    assert_compared(loaded[case.id])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mla_back_to_hf_is_bitwise(case: Case, written, tmp_path) -> None:
    """HF -> our torch_dist -> HF (the torch_dist reader, dist.py): every tensor and the config."""
    assert_back_to_hf_bitwise(written / case.id, written / f"hf-{case.id}", tmp_path / "back", case.family)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """root/NAME/hf, root/NAME/ours (our torch_dist at (tp, ep)) and root/NAME/mcore (megatron-core's
    save of the GPTModel loaded strictly from our legacy files at (tp, ep))."""
    import megatron.core.models.gpt  # noqa: F401
    from mcore_ranks import save_dist_group

    root = tmp_path_factory.mktemp("mlasaved")
    records = []
    for name, (family, overrides, tp, ep) in SAVED.items():
        deepseek(MlaCase(family, tp, ep, overrides)).save_pretrained(root / name / "hf")
        convert(root / name / "hf", root / name / "legacy", to="megatron",
                layout=MegatronLayout(tp=tp, ep=ep))
        convert(root / name / "hf", root / name / "ours", to="megatron",
                layout=MegatronLayout(tp=tp, ep=ep, ckpt_format="torch_dist"))
        records.append({"dir": str(root / name / "legacy"), "dist": str(root / name / "mcore"),
                        "tp": tp, "pp": 1, "ep": ep, "vpp": None, "te": False})
    (root / "cases.json").write_text(json.dumps(records))
    spawn(save_dist_group, 2, str(root / "cases.json"), timeout_s=240, method="fork")
    return root


@pytest.mark.parametrize("name", list(SAVED))
def test_mla_metadata_is_what_megatron_cores_save_writes(name: str, saved) -> None:
    """Every key, global shape, dtype and chunk (and every extra-state object) of ours is
    megatron-core's own save's."""
    ours, theirs = (_boxes(saved / name / d / "iter_0000001") for d in ("ours", "mcore"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key
    q = "linear_q_proj" if SAVED[name][1].get("q_lora_rank", 24) is None else "linear_q_down_proj"
    per_layer = "decoder.layers.0." if "stacked" not in name else "decoder.layers."
    assert {per_layer + "input_layernorm.weight", per_layer + f"self_attention.{q}.weight",
            per_layer + "self_attention.kv_layernorm.weight"} <= set(ours)
    assert not any("layer_norm_weight" in k or "linear_qkv" in k for k in ours)


@pytest.mark.parametrize("name", list(SAVED))
def test_megatron_cores_mla_save_to_hf_is_bitwise_with_equal_logits(name: str, saved, tmp_path) -> None:
    """megatron-core's save records no family (no hf_source.json): the args alone name DeepSeek-V2
    or -V3; every HF tensor comes back bitwise, and transformers' logits are equal."""
    src, family = saved / name / "mcore", SAVED[name][0]
    assert not (src / "hf_source.json").exists()
    assert cli(src, tmp_path / "hf", "--to", "hf") == 0
    original = saved / name / "hf"
    assert_bitwise(read_tensors(original), read_tensors(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["q_lora_rank"]) == (family, SAVED[name][1].get("q_lora_rank", 24))
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    back, want = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation="eager",
                                                       experts_implementation="eager").eval()
                  for p in (tmp_path / "hf", original))
    torch.testing.assert_close(logits(back, ids), logits(want, ids))


@pytest.mark.parametrize(("family", "overrides", "flags", "needles"), [
    # V2's group score is its best expert; megatron-core sums top_k // topk_group = 2
    ("deepseek_v2", {**BASE, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, [],
     ["moe", "group_score='max'"]),
    ("deepseek_v3", {**BASE, "rms_norm_eps": 1e-5}, [], ["norm_eps", "1e-06"]),  # latent norms' own eps
    ("deepseek_v3", {**BASE, "kv_lora_rank": 15}, ["--tp", "2"], ["--tp 2", "kv_lora_rank"]),
    ("deepseek_v3", BASE, ["--layer-spec", "te"], ["--layer-spec te"]),
], ids=["v2-group-max", "latent-eps", "tp-latent", "te-spec"])
def test_what_megatron_core_computes_otherwise_is_refused_in_torch_dist_too(family, overrides, flags, needles,
                                                                           tmp_path, capsys) -> None:
    deepseek(MlaCase(family, 1, 1, overrides)).save_pretrained(tmp_path / "hf")
    assert_refused(tmp_path / "hf", capsys, flags, needles)


def test_torch_format_mla_to_torch_dist_writes_the_same_bytes_as_from_hf(tmp_path) -> None:
    """Megatron `torch` (TP 2 x EP 2) -> `torch_dist` writes the very .distcp file HF -> `torch_dist` does."""
    deepseek(MlaCase("deepseek_v3", 2, 2, BASE)).save_pretrained(tmp_path / "hf")
    assert_via_torch_writes_the_same_bytes(tmp_path / "hf", tmp_path)
