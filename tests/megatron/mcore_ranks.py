"""Converted checkpoints run in the real megatron-core GPTModel: ranks under gloo on the CPU.

One process group per world size runs every case of that size: for each, it sets up the
model-parallel groups, builds GPTModel from the checkpoint's own `args` (as Megatron-LM's
`pretrain_gpt.py` would), loads each rank's file with `strict=True`, drives the pipeline
stages by hand (send/recv; megatron's schedules allocate on CUDA) and, on the last stage,
gathers the vocab-parallel logits for the parent to compare with the HF model's.

GPTModel is built, and its stages driven, by the library's own `reference.verify.mcore_model`
(what `reference verify` runs); the CUDA side-steps stay on for the whole rank (tests/mcore_cpu.py).
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path
from typing import Any

from mcore_cpu import side_steps
from procs import join_gloo

from reference.verify.mcore_model import build, forward, te_to_local

TIMEOUT_S = 120


def world_of(case: dict[str, Any]) -> int:
    """Ranks a case runs on: the fewest whose stage both TP (x data parallel) and expert TP x EP
    (x expert data parallel) fill, times PP; TP x EP x PP when experts' TP ("etp") is TP."""
    return math.lcm(case["tp"], (case.get("etp") or case["tp"]) * case.get("ep", 1)) * case["pp"]


def _rank_file(case: dict[str, Any], tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
    root = Path(case["dir"])
    iteration = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    name = f"mp_rank_{tp_rank:02d}" if case["pp"] == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    if case.get("ep", 1) > 1:  # Megatron-LM's get_checkpoint_name appends the EP rank
        name += f"_{ep_rank:03d}"
    return root / f"iter_{int(iteration):07d}" / name / "model_optim_rng.pt"


def _load(case: dict[str, Any]) -> list[Any]:
    """Every virtual stage of this rank, loaded strictly from its file."""
    import torch
    from megatron.core import parallel_state as ps

    state = torch.load(_rank_file(case, ps.get_tensor_model_parallel_rank(),
                                  ps.get_pipeline_model_parallel_rank(),
                                  ps.get_expert_model_parallel_rank()), weights_only=False)
    args, vpp = state["args"], case["vpp"]
    assert state["checkpoint_version"] == 3.0 and args.tensor_model_parallel_size == case["tp"]
    models = []
    for v in range(vpp or 1):
        model = build(args, v if vpp else None)
        sd = state["model" if vpp is None else f"model{v}"]
        model.load_state_dict(te_to_local(sd) if case["te"] else sd, strict=True)
        models.append(model)
    return models


def _case(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=case["tp"],
                                 pipeline_model_parallel_size=case["pp"],
                                 virtual_pipeline_model_parallel_size=case["vpp"],
                                 expert_model_parallel_size=case.get("ep", 1),
                                 expert_tensor_parallel_size=case.get("etp"))
    result: dict[str, Any] = {"error": None, "compared": False}
    try:
        models = _load(case)
    except Exception:
        result["error"] = traceback.format_exc(limit=-3)
    ok = torch.tensor([result["error"] is None], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips the forward if one failed
    if ok.item():
        ref = torch.load(case["ref"])
        shard = forward(models, ref["input_ids"])
        if shard is not None:
            pieces = [torch.empty_like(shard) for _ in range(case["tp"])]
            dist.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(pieces, dim=-1)[..., : ref["logits"].shape[-1]]
            result["compared"] = True
            result["max_diff"] = (logits - ref["logits"]).abs().max().item()
            try:
                torch.testing.assert_close(logits, ref["logits"])  # default fp32 tolerance
            except AssertionError as e:
                result["error"] = str(e)
    ps.destroy_model_parallel()
    return result


def run_group(rank: int, world: int, port: int, cases_file: str, out_dir: str, case: Any = None) -> None:
    """Entry point of one rank: every case of this world size run by `case` (default: load the
    legacy rank files and compare), results to out_dir/rank{N}.json."""
    import torch.distributed as dist

    join_gloo(rank, world, port, TIMEOUT_S)
    side_steps()
    cases = [c for c in json.loads(Path(cases_file).read_text()) if world_of(c) == world]
    results = {c["id"]: (case or _case)(c) for c in cases}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # rank 0 hosts the store: nobody leaves before everyone has written
    dist.destroy_process_group()


def save_dist_group(rank: int, world: int, port: int, cases_file: str) -> None:
    """Entry point of one rank: every case's legacy files loaded strictly into GPTModel, then
    saved by megatron-core's own `dist_checkpointing.save` (torch_dist) to case["dist"], as
    Megatron-LM's `save_checkpoint` lays it out (tracker, iter_0000001, args in common.pt)."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    join_gloo(rank, world, port, TIMEOUT_S)
    side_steps()
    torch.cuda.synchronize = lambda *a, **k: None  # the save path's preload_tensors (notes)
    for case in json.loads(Path(cases_file).read_text()):
        ps.initialize_model_parallel(tensor_model_parallel_size=case["tp"],
                                     pipeline_model_parallel_size=case["pp"],
                                     virtual_pipeline_model_parallel_size=case["vpp"],
                                     expert_model_parallel_size=case.get("ep", 1),
                                     expert_tensor_parallel_size=case.get("etp"))
        models = _load(case)
        args = torch.load(_rank_file(case, 0, 0), weights_only=False)["args"]
        root = Path(case["dist"])
        where = root / "iter_0000001"
        where.mkdir(parents=True, exist_ok=True)  # the target must exist before save
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 1}
        # Megatron-LM's generate_state_dict: "model", or "model0", "model1", ... per virtual stage
        # (the sharded keys are global, so the stages land in one [L, ...] stack either way);
        # case["metadata"] is its sharded-state-dict metadata (non_homogeneous_layers,
        # singleton_local_shards), also saved as the checkpoint's content_metadata.
        metadata = case.get("metadata")
        if case["vpp"] is None:
            state["model"] = models[0].sharded_state_dict(metadata=metadata)
        for v, model in enumerate(models if case["vpp"] else []):
            state[f"model{v}"] = model.sharded_state_dict(metadata=metadata)
        dist_checkpointing.save(state, str(where), content_metadata=metadata)
        if rank == 0:
            (root / "latest_checkpointed_iteration.txt").write_text("1")
        dist.barrier()
        ps.destroy_model_parallel()
    dist.destroy_process_group()


def run_cases(records: list[dict[str, Any]], work: Path, case: Any = None) -> dict[str, dict[str, Any]]:
    """Every case run by `case` (see run_group) in one process group per world size; per case
    id: errors from any rank, whether a last stage compared, its max |logits - hf|."""
    from procs import spawn

    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps(records))
    merged: dict[str, dict[str, Any]] = {r["id"]: {"errors": [], "compared": False, "max_diff": None}
                                         for r in records}
    for world in sorted({world_of(r) for r in records}):
        out = work / f"world{world}"
        out.mkdir()
        spawn(run_group, world, str(cases_file), str(out), case, timeout_s=240, method="fork")
        for rank in range(world):
            for cid, r in json.loads((out / f"rank{rank}.json").read_text()).items():
                merged[cid]["errors"] += [f"rank {rank}: {r['error']}"] if r["error"] else []
                merged[cid]["compared"] |= r["compared"]
                merged[cid]["max_diff"] = r.get("max_diff", merged[cid]["max_diff"])
    return merged


def assert_compared(result: dict[str, Any]) -> None:
    """A case of run_cases: no rank failed, and a last stage compared the logits with HF's."""
    assert not result["errors"], "\n".join(result["errors"])
    assert result["compared"], "no last-stage rank compared the logits"
    print(f"max |logits - hf| = {result['max_diff']:.2e}")


def assert_back_to_hf_bitwise(megatron: Path, hf: Path, back: Path, family: str) -> None:
    """Megatron -> HF gives back the HF directory it came from: the family, no folds or caveats,
    config.json field for field and every tensor bitwise."""
    from harness import assert_bitwise, read_tensors

    from reference.converters import convert

    report = convert(megatron, back, to="hf")
    assert report.target == family and not report.folds and not report.caveats
    assert json.loads((back / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert_bitwise(read_tensors(hf), read_tensors(back))
