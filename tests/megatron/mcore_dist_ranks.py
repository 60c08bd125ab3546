"""Our `torch_dist` checkpoints loaded by megatron-core itself: ranks under gloo on the CPU.

As Megatron-LM's `load_checkpoint` does for this format: the args come from common.pt, the
model is built at the layout of the loading job (which may differ from the one the args
record: that is resharding on load), its `sharded_state_dict()` is built with the checkpoint's
own `content_metadata`, and `dist_checkpointing.load` fills it, here with RETURN_ALL: a key
the model asks for and the checkpoint lacks, or one the checkpoint has beyond the expected
TransformerEngine objects, or a global shape that differs, fails. Then GPTModel's logits are gathered
as in mcore_ranks.py and compared with the HF model's.
"""

from __future__ import annotations

import traceback
from argparse import Namespace
from pathlib import Path
from typing import Any

from reference.verify.mcore_model import build, forward


def _load(case: dict[str, Any]) -> tuple[Any, Namespace, dict[str, Any]]:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    where = str(Path(case["dist"]) / "iter_0000001")
    common = dist_checkpointing.load_common_state_dict(where)
    saved = common["args"]
    assert (common["checkpoint_version"], common["iteration"], saved.ckpt_format) == (3.0, 1, "torch_dist")
    # The loading job's own layout; every other argument is the checkpoint's.
    # (a mixture's experts too: EP and expert TP as the case says, expert TP TP's by default)
    experts = {"expert_model_parallel_size": case.get("ep", 1),
               "expert_tensor_parallel_size": case.get("etp") or case["tp"]}
    args = Namespace(**{**vars(saved), "tensor_model_parallel_size": case["tp"],
                        "pipeline_model_parallel_size": case["pp"],
                        **(experts if getattr(saved, "num_experts", None) else {}),
                        "virtual_pipeline_model_parallel_size": None, "pipeline_model_parallel_layout": None})
    model = build(args, None)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    assert metadata == {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                        "chained_optim_avoid_prefix": True}, metadata
    sharded = {"model": model.sharded_state_dict(metadata=metadata)}
    # Every key the model asks for is there (none unexpected), and what it does not ask for is
    # exactly case["te_only"]: the extra states of the norms that are TE modules where
    # TransformerEngine is installed. By default, a dense model's final norm (keys.FINAL_NORM:
    # TENorm for the local spec too); a TransformerEngine-spec checkpoint names its q/k norms too.
    te_only = case.get("te_only")
    if te_only is None:
        te_only = [] if getattr(saved, "num_experts", None) else ["decoder.final_layernorm._extra_state"]
    state, missing, unexpected = dist_checkpointing.load(sharded, where, strict=StrictHandling.RETURN_ALL)
    assert not unexpected, sorted(unexpected)
    assert sorted(missing) == sorted(te_only), sorted(missing)
    model.load_state_dict(state["model"], strict=True)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    return model, args, metadata


def _resave(model: Any, args: Namespace, metadata: dict[str, Any], root: Path) -> None:
    """megatron-core's own `dist_checkpointing.save` of the loaded model, laid out as
    Megatron-LM's `save_checkpoint` does (as mcore_ranks.save_dist_group): its `.metadata` is
    what a save at the loading layout writes, whatever values the model holds."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    torch.cuda.synchronize = lambda *a, **k: None  # the save path's preload_tensors (notes)
    where = root / "iter_0000001"
    where.mkdir(parents=True, exist_ok=True)  # the target must exist before save
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 1,
             "model": model.sharded_state_dict(metadata=metadata)}
    dist_checkpointing.save(state, str(where), content_metadata=metadata)
    if dist.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text("1")
    dist.barrier()


def load_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this rank: our torch_dist loaded by megatron-core, logits compared (run_group);
    with case["resave"] a directory, the loaded model saved there by megatron-core too."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=case["tp"],
                                 pipeline_model_parallel_size=case["pp"],
                                 expert_model_parallel_size=case.get("ep", 1),
                                 expert_tensor_parallel_size=case.get("etp"))
    result: dict[str, Any] = {"error": None, "compared": False}
    model = None
    try:
        model, args, metadata = _load(case)
        if case.get("resave"):
            _resave(model, args, metadata, Path(case["resave"]))
    except Exception:
        result["error"] = traceback.format_exc(limit=-4)
    ok = torch.tensor([result["error"] is None], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips the forward if one failed
    if ok.item():
        ref = torch.load(case["ref"])
        shard = forward([model], ref["input_ids"])
        if shard is not None:
            pieces = [torch.empty_like(shard) for _ in range(case["tp"])]
            dist.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(pieces, dim=-1)
            padding = logits[..., ref["logits"].shape[-1]:]
            logits = logits[..., : ref["logits"].shape[-1]]
            result["compared"] = True
            result["max_diff"] = (logits - ref["logits"]).abs().max().item()
            try:
                torch.testing.assert_close(logits, ref["logits"])  # default fp32 tolerance
                assert torch.equal(padding, torch.zeros_like(padding)), "padded vocabulary rows are not zeros"
            except AssertionError as e:
                result["error"] = str(e)
    ps.destroy_model_parallel()
    return result
