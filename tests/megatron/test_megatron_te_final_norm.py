"""The local spec's final norm where TransformerEngine is installed (an NVIDIA container).

megatron-core 0.16.1's TransformerBlock, given one layer's spec (what Megatron-LM's gpt_builders
passes for a dense model, `--transformer-impl local` too), builds its final norm from
`transformer_block.LayerNormImpl`: TENorm whenever TE imports, whose TE RMSNorm/LayerNorm op has
an extra state (an empty uint8 tensor without FP8, TE 2.9+), so the model's sharded state dict
asks for `decoder.final_layernorm._extra_state`. Megatron-LM loads `torch_dist` under
`--dist-ckpt-strictness assume_ok_unexpected` (its default): an object the model asks for and the
checkpoint lacks is fatal, one the checkpoint has and the model does not ask for is ignored. So
our dense local-spec `torch_dist` carries that object (keys.FINAL_NORM), and:
- megatron-core without TE loads it under that default (and under RETURN_ALL it is the one key
  left over: mcore_dist_ranks, test_megatron_dist_write);
- megatron-core as built where TE is installed loads it too, its norm given TE's "no FP8"
  marker, and its logits equal HF's; megatron-core's own save without TE, which lacks the
  object, is refused by the same load: what our checkpoint did before;
- our legacy rank files keep the TE-less key set; where TE is installed torch's strict load names
  the one missing key and Megatron-LM's non-strict retry (load_model_state_dict) loads every
  weight, the logits equal HF's; `reference verify` takes that key as the build has it.

TransformerEngine cannot be installed here (no CUDA), so "where TE is installed" is megatron-core
with LayerNormImpl set as its import of TE sets it, to a torch RMSNorm with TE's extra state.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mcore_ranks import assert_compared
from test_megatron_dist_te import _objects
from test_megatron_dist_write import _boxes, tied_scaled, write_cases
from test_megatron_equivalence import SHAPES

from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.converters.megatron.read import load_rank_file
from reference.tiny import tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

OBJECT = "decoder.final_layernorm._extra_state/shard_0_1"


class TENormStandIn(torch.nn.RMSNorm):
    """What TENorm builds without FP8: an RMSNorm whose extra state is TE's empty uint8 tensor."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        self.received: list[Any] = []

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        self.received.append(state)


@contextlib.contextmanager
def te_installed() -> Iterator[None]:
    """megatron-core's transformer_block as its `import transformer_engine` makes it."""
    from megatron.core.transformer import transformer_block

    kept = transformer_block.LayerNormImpl
    transformer_block.LayerNormImpl = TENormStandIn
    try:
        yield
    finally:
        transformer_block.LayerNormImpl = kept


def test_dense_local_torch_dist_carries_the_final_norm_object_mixtures_and_rank_files_not(tmp_path) -> None:
    for family in ("llama", "mixtral"):
        tiny_model(family, tie=False).save_pretrained(tmp_path / family)
        convert(tmp_path / family, tmp_path / f"{family}-dist", to="megatron",
                layout=MegatronLayout(ckpt_format="torch_dist"))
        convert(tmp_path / family, tmp_path / f"{family}-torch", to="megatron", layout=MegatronLayout())
    dense = tmp_path / "llama-dist" / "iter_0000001"
    assert _boxes(dense)[OBJECT] == "bytes"
    held = _objects(dense, [OBJECT])[OBJECT]  # megatron-core's torch_dist: the list of local shards' data
    assert len(held) == 1 and held[0].dtype == torch.uint8 and held[0].numel() == 0
    # a mixture's block spec names its final norm itself: TE's only in the TE spec
    mixture = _boxes(tmp_path / "mixtral-dist" / "iter_0000001")
    assert "decoder.final_layernorm.weight" in mixture
    assert not any("final_layernorm._extra" in k for k in mixture)
    for family in ("llama", "mixtral"):
        (rank_file,) = (tmp_path / f"{family}-torch").rglob("model_optim_rng.pt")
        model = load_rank_file(rank_file)["model"]
        assert "decoder.final_layernorm.weight" in model
        assert "decoder.final_layernorm._extra_state" not in model


def _te_machine(case: dict[str, Any]) -> list[Any]:
    """The checks of one rank (see the module docstring); the TE-machine models to run."""
    from mcore_dist_ranks import _resave
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from torch.distributed.checkpoint.api import CheckpointException

    from reference.verify.mcore_model import build
    from reference.verify.mcore_ranks import MegatronJob, _strict

    where = Path(case["dist"]) / "iter_0000001"
    common = dist_checkpointing.load_common_state_dict(str(where))
    args = common["args"]
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)

    # Without TE, Megatron-LM's default strictness: the object it does not ask for is ignored.
    plain = build(args, None)
    assert "decoder.final_layernorm._extra_state" not in plain.sharded_state_dict(metadata=metadata)
    state = dist_checkpointing.load({"model": plain.sharded_state_dict(metadata=metadata)}, str(where))
    plain.load_state_dict(state["model"], strict=True)
    _resave(plain, args, metadata, Path(case["mcore"]))  # megatron-core's own save without TE

    # Where TE is installed: the final norm asks for its object; ours holds it.
    with te_installed():
        te = build(args, None)
    norm = te.decoder.final_layernorm
    assert isinstance(norm, TENormStandIn)  # the layers' norms are the local spec's own
    assert type(te.decoder.layers[0].input_layernorm) is torch.nn.RMSNorm
    sharded = {"model": te.sharded_state_dict(metadata=metadata)}
    assert "decoder.final_layernorm._extra_state" in sharded["model"]
    state = dist_checkpointing.load(sharded, str(where))  # strict: assume_ok_unexpected, as Megatron-LM's
    te.load_state_dict(state["model"], strict=True)
    assert len(norm.received) == 1 and norm.received[0].dtype == torch.uint8 and norm.received[0].numel() == 0

    # A checkpoint without the object (megatron-core's save without TE) is refused the same load.
    with te_installed():
        refused = build(args, None)
    try:
        dist_checkpointing.load({"model": refused.sharded_state_dict(metadata=metadata)},
                                str(Path(case["mcore"]) / "iter_0000001"))
    except CheckpointException as e:  # a BaseException
        assert f"Missing key in checkpoint state_dict: {OBJECT}" in str(e), str(e)
    else:
        raise AssertionError("megatron-core's TE-less save loaded where TE asks for the final norm's object")

    # Our legacy rank file where TE is installed: strict names the one missing key; Megatron-LM's
    # retry with strict=False (checkpointing.load_model_state_dict) loads everything else.
    tp_rank = ps.get_tensor_model_parallel_rank()
    rank = torch.load(Path(case["legacy"]) / "iter_0000001" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt",
                      weights_only=False)
    with te_installed():
        legacy = build(rank["args"], None)
    missing = r'Missing key\(s\) in state_dict: "decoder.final_layernorm._extra_state"\.'
    with pytest.raises(RuntimeError, match=missing):
        legacy.load_state_dict(rank["model"], strict=True)
    result = legacy.load_state_dict(rank["model"], strict=False)
    assert result.missing_keys == ["decoder.final_layernorm._extra_state"] and not result.unexpected_keys

    # `reference verify` loads a rank file strictly as either build has it: ours where TE is
    # installed, and one Megatron-LM saved there (with the key) where TE is not.
    job = MegatronJob("torch", {"0,0,0": case["legacy"]}, 2, 2, "local", 0, [[0]], None)
    with te_installed():
        verified = build(rank["args"], None)
    _strict(verified, rank["model"], job, "model")
    got = verified.decoder.final_layernorm.received
    assert len(got) == 1 and got[0].dtype == torch.uint8 and got[0].numel() == 0
    with_te = {**rank["model"], "decoder.final_layernorm._extra_state": torch.empty(0, dtype=torch.uint8)}
    _strict(build(rank["args"], None), with_te, job, "model")
    return [te, legacy]


def te_machine(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this rank (run_group): the checks, then both TE-machine models' logits vs HF's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from reference.verify.mcore_model import forward

    ps.initialize_model_parallel(tensor_model_parallel_size=case["tp"],
                                 pipeline_model_parallel_size=case["pp"])
    result: dict[str, Any] = {"error": None, "compared": False}
    models: list[Any] = []
    try:
        models = _te_machine(case)
    except BaseException:  # torch's CheckpointException is a BaseException
        result["error"] = traceback.format_exc(limit=-4)
    ok = torch.tensor([result["error"] is None], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips the forward if one failed
    if ok.item():
        ref = torch.load(case["ref"])
        for model in models:
            shard = forward([model], ref["input_ids"])
            pieces = [torch.empty_like(shard) for _ in range(case["tp"])]
            dist.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(pieces, dim=-1)[..., : ref["logits"].shape[-1]]
            result["max_diff"] = max(result.get("max_diff", 0.0), (logits - ref["logits"]).abs().max().item())
            try:
                torch.testing.assert_close(logits, ref["logits"])  # default fp32 tolerance
            except AssertionError as e:
                result["error"] = str(e)
        result["compared"] = True
    ps.destroy_model_parallel()
    return result


def test_where_te_is_installed_ours_loads_under_megatron_lms_default_strictness(tmp_path) -> None:
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_ranks import run_cases
    from test_megatron_dist_write import Case

    case = Case("qwen2", False, "g4x2", (2, 1), 2, 1)  # bias, GQA (4 groups of 2), TP 2
    write_cases(tmp_path, [case], lambda c: tied_scaled(c.family, c.tie, **SHAPES[c.shape]))
    convert(tmp_path / f"hf-{case.id}", tmp_path / "legacy", to="megatron", layout=MegatronLayout(tp=2))
    record = {"id": case.id, "tp": 2, "pp": 1, "dist": str(tmp_path / case.id),
              "ref": str(tmp_path / f"{case.id}.ref.pt"), "mcore": str(tmp_path / "mcore"),
              "legacy": str(tmp_path / "legacy")}
    (tmp_path / "ranks").mkdir()
    assert_compared(run_cases([record], tmp_path / "ranks", te_machine)[case.id])
