"""HF -> Megatron-LM `torch_dist` in TransformerEngine's layer spec (`--layer-spec te`).

TransformerEngine is not installed here, so, as for the `torch` format's TE layout, its names
are proven by mapping onto the local spec that megatron-core runs on the CPU:
- our TE checkpoint reads back to the HF model bitwise;
- its `.metadata` is megatron-core's own local-spec save of the same model (keys, global
  shapes, dtypes, boxes) once the TE-only objects are set aside: the `_extra_state` of the
  norms that are TE modules in that spec (q/k norms, final norm), which megatron-core's
  sharded_state_dict declares, like every module's, as a ShardedObject (BytesStorageMetadata);
  the linears' objects hold TE's empty uint8 tensor where megatron-core's local linears save None;
- megatron-core's local-spec GPTModel, built at another layout, loads it with every key it asks
  for present and nothing left over but those TE-only objects, and its fp32 logits equal the
  HF model's at assert_close's default tolerance.
`nox -s equivalence` (REFERENCE_EQUIVALENCE=1) runs more families, ties and layouts.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from mcore_ranks import assert_back_to_hf_bitwise, assert_compared
from procs import spawn
from test_megatron_dist_write import Case, _boxes, tied_scaled, write_cases
from test_megatron_equivalence import SHAPES
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load

from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.tiny import tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

GATE = os.environ.get("REFERENCE_EQUIVALENCE") == "1"


DEFAULT = [
    Case("llama", False, "g4x2", (2, 1), 1, 2),  # GQA, resharded TP 2 -> PP 2
    Case("qwen3", True, "g2x8", (1, 2), 2, 1),  # qk norms (TE-only objects per layer), PP 2 -> TP 2
]
MATRIX = [Case(f, tie, shape, write, tp, pp)
          for f, shape in (("llama", "g2x8"), ("qwen2", "g4x2"), ("qwen3", "g4x2"), ("mistral", "g2x8"))
          for tie in (False, True)
          for write, (tp, pp) in (((1, 1), (2, 2)), ((2, 2), (1, 1)))]
CASES = DEFAULT + MATRIX if GATE else DEFAULT


def _te_only(where: Path) -> list[str]:
    """The ShardedObjects of our TE checkpoint that megatron-core's local spec does not declare:
    the norms' extra states (TE modules in the TE spec; the local spec's norms have no
    extra state)."""
    objects = [k for k, v in _boxes(where).items() if v == "bytes"]
    return sorted(k for k in objects if k.split("/")[0].endswith("layernorm._extra_state"))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("distte"), CASES,
                       lambda c: tied_scaled(c.family, c.tie, **SHAPES[c.shape]), "--layer-spec", "te")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_back_to_hf_is_bitwise(case: Case, written, tmp_path) -> None:
    args = torch.load(written / case.id / "iter_0000001" / "common.pt", weights_only=False)["args"]
    assert args.transformer_impl == "transformer_engine"
    assert_back_to_hf_bitwise(written / case.id, written / f"hf-{case.id}", tmp_path / "back", case.family)


@pytest.fixture(scope="module")
def loaded(written, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Per case: megatron-core's local-spec GPTModel loading our TE checkpoint (mcore_dist_ranks)."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_dist_ranks import load_case
    from mcore_ranks import run_cases

    records = [{**asdict(c), "id": c.id, "dist": str(written / c.id), "ref": str(written / f"{c.id}.ref.pt"),
                # megatron-core names a ShardedObject it was not asked for by its key, not by shard
                "te_only": sorted({k.split("/")[0] for k in _te_only(written / c.id / "iter_0000001")})}
               for c in CASES]
    return run_cases(records, tmp_path_factory.mktemp("ranks"), load_case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_local_spec_megatron_core_loads_it_and_logits_equal_hf(case: Case, loaded) -> None:
    assert_compared(loaded[case.id])


def _objects(where: Path, keys: list[str]) -> dict[str, Any]:
    """What each ShardedObject holds: torch.load of its bytes (megatron-core's torch_dist
    strategy saves the list of the object's local shards' data)."""
    state: dict[str, Any] = {k: io.BytesIO() for k in keys}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(state, storage_reader=FileSystemReader(str(where)), no_dist=True)
    return state


def test_metadata_is_megatron_cores_local_save_plus_te_norm_objects(tmp_path) -> None:
    """Against megatron-core's own `dist_checkpointing.save` of the same model in the local spec
    at TP 2: the same tensors (key, global shape, dtype, every box); the same objects, and
    besides them exactly the TE norms' (q/k norms of every layer, the final norm)."""
    import megatron.core.models.gpt  # noqa: F401
    from mcore_ranks import save_dist_group

    records, layers = [], {}
    families = (("llama", False, "g4x2"), ("qwen3", True, "g2x8"))
    for family, tie, shape in families:
        model = tiny_model(family, tie=tie, **SHAPES[shape])
        model.save_pretrained(tmp_path / family / "hf")
        layers[family] = model.config.num_hidden_layers
        convert(tmp_path / family / "hf", tmp_path / family / "legacy", to="megatron",
                layout=MegatronLayout(tp=2))
        convert(tmp_path / family / "hf", tmp_path / family / "ours", to="megatron",
                layout=MegatronLayout(tp=2, layer_spec="te", ckpt_format="torch_dist"))
        records.append({"dir": str(tmp_path / family / "legacy"), "dist": str(tmp_path / family / "mcore"),
                        "tp": 2, "pp": 1, "vpp": None, "te": False})
    (tmp_path / "cases.json").write_text(json.dumps(records))
    spawn(save_dist_group, 2, str(tmp_path / "cases.json"), timeout_s=240, method="fork")
    for family, _, _ in families:
        where = tmp_path / family / "ours" / "iter_0000001"
        ours, theirs = _boxes(where), _boxes(tmp_path / family / "mcore" / "iter_0000001")
        n = layers[family]  # the q/k norms' objects are stacked by layer, the final norm's is one
        te_only = sorted(["decoder.final_layernorm._extra_state/shard_0_1"]
                         + [f"decoder.layers.self_attention.{qk}_layernorm._extra_state/shard_{i}_{n}"
                            for qk in "qk" if family == "qwen3" for i in range(n)])
        assert _te_only(where) == te_only
        assert sorted(set(ours) - set(theirs)) == te_only and set(theirs) <= set(ours)
        for key in theirs:
            assert ours[key] == theirs[key], key
        # bytes on both sides; what they hold: TE's "no FP8" marker where the local linears hold None
        objects = sorted(k for k, v in ours.items() if v == "bytes")
        held, held_theirs = _objects(where, objects), _objects(where.parent.parent / "mcore" / "iter_0000001",
                                                                [k for k in objects if k not in te_only])
        for key in objects:
            value = held[key]
            assert isinstance(value, list) and len(value) == 1, key
            assert value[0].dtype == torch.uint8 and value[0].numel() == 0, key
            if key not in te_only:
                assert held_theirs[key] == [None], key
