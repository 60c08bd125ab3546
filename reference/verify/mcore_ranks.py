"""A Megatron-LM checkpoint run by megatron-core itself, at the parallel layout it was saved
with: one process per rank, spawned fresh, joined under NCCL when there is a GPU for every
rank, else under gloo on the CPU (with `cpu_side_steps` applied inside each rank, restored on exit).

A mixture of experts runs on TP x PP x EP ranks: each expert-parallel rank is a data-parallel
copy of the rest of the model that holds its own experts, and the tokens reach the experts of
the other EP ranks through megatron-core's token dispatcher. With experts at a TP size of their
own (expert TP), a stage has lcm(TP, expert TP x EP) ranks, as megatron-core lays them out.

Legacy `torch` checkpoints: each rank loads its own rank file (`mp_rank_TT[_PPP][_EEE]`) with
`strict=True`. `torch_dist` checkpoints: each rank loads through megatron-core's
`dist_checkpointing.load` into its model's `sharded_state_dict()`, as Megatron-LM's
`load_checkpoint` does. The ranks run the same token ids in fp32, then in fp64 (the noise
floor, see `compare.py`); the rank that holds the answer (TP rank 0 of the first data-parallel
copy, on the last stage or on the stage holding layer K) writes it for the parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reference.errors import InputError

TIMEOUT_S = 600
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class MegatronJob:
    """What every rank needs: where the weights are and what to run."""

    kind: str  # "torch" or "torch_dist"
    files: dict[str, str]  # torch: "tp,pp,ep" -> rank file; torch_dist: {"dir": iteration dir}
    world: int  # stage x PP; stage for the first layers of a legacy checkpoint (`_collapsed`)
    stage: int  # ranks per pipeline stage: TP x EP, lcm(TP, expert TP x EP) with expert TP != TP
    layer_spec: str  # "local" or "te"
    vocab_size: int  # logits are trimmed to it (the padded rows are zeros)
    ids: list[list[int]]
    layers: int | None  # compare the hidden states after this many layers; None: logits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_megatron(job: MegatronJob, start_method: str = "spawn") -> dict[str, torch.Tensor]:
    """Start the job's ranks; {"float32": out, "float64": out} from the rank that holds it.

    Fresh processes ("spawn") by default: a forked rank inherits the caller's threads and CUDA
    state. A caller that has imported megatron-core and holds neither (tests) may "fork" to
    save every rank the import."""
    import torch.multiprocessing as mp

    # The CPU's cores shared among the ranks; one thread in a forked rank, whose copy of the
    # parent's OpenMP pool would hang on first use (GNU OpenMP is not fork-safe).
    threads = 1 if start_method == "fork" else max(1, (os.cpu_count() or 1) // job.world)
    with tempfile.TemporaryDirectory(prefix="reference-verify-") as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job.__dict__))
        for attempt in range(3):
            ctx = mp.start_processes(rank_main, args=(job.world, _free_port(), tmp, threads),
                                     nprocs=job.world, join=False, start_method=start_method)
            # past the collectives' own timeout: a stuck rank then says where, in its traceback
            deadline = time.monotonic() + TIMEOUT_S + 60
            try:
                while not ctx.join(timeout=5):
                    if time.monotonic() > deadline:
                        for p in ctx.processes:
                            p.kill()
                        raise RuntimeError(f"megatron-core ranks still running after {TIMEOUT_S + 60} s")
                break
            except mp.ProcessRaisedException as e:
                # the port was taken between the check and the bind: a fresh one, not a bug
                if "EADDRINUSE" not in str(e) or attempt == 2:
                    raise
        results = [torch.load(p, weights_only=True) for p in sorted(Path(tmp).glob("rank*.pt"))]
    for r in results:
        if r.get("error"):
            raise InputError(r["error"])
        if r.get("crash"):
            raise RuntimeError(f"a megatron-core rank failed:\n{r['crash']}")
    held = [r for r in results if "float32" in r]
    assert len(held) == 1, f"{len(held)} ranks returned an answer"
    return {k: held[0][k] for k in DTYPES}


def rank_main(rank: int, world: int, port: int, tmp: str, threads: int) -> None:
    """Entry point of one rank."""
    import warnings
    from datetime import timedelta

    import torch.distributed as dist

    # "Apex is not installed", "CUDA_DEVICE_MAX_CONNECTIONS": once per rank, about training speed
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    # torch's ShardedTensor / load_state_dict deprecations, raised inside megatron-core's torch_dist
    # loader: about their API's future, not this checkpoint
    warnings.filterwarnings("ignore", category=FutureWarning,
                            module=r"(megatron|torch\.distributed\.checkpoint)\.")
    # and the collectives megatron-core's MoE token dispatcher calls, deprecated in torch
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
    torch.set_num_threads(threads)
    job = MegatronJob(**json.loads((Path(tmp) / "job.json").read_text()))
    cuda = torch.cuda.device_count() >= world  # NCCL wants a GPU of its own for every rank
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    from reference.verify.cpu import cpu_side_steps, te_side_steps

    with te_side_steps(), contextlib.nullcontext() if cuda else cpu_side_steps():
        out = _run(job, torch.device("cuda") if cuda else torch.device("cpu"))
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()  # rank 0 hosts the store: nobody leaves before everyone has written
    dist.destroy_process_group()


def _args(job: MegatronJob, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> tuple[Any, Any]:
    """(args, rank file state or None) of this rank."""
    if job.kind == "torch":
        from reference.converters.megatron.read import load_rank_file

        path = job.files[f"{tp_rank},{pp_rank},{ep_rank}"]
        state = load_rank_file(Path(path))
        return state["args"], state
    from reference.converters.megatron.dist import COMMON, load_common

    return load_common(Path(job.files["dir"]) / COMMON)["args"], None


def _collapsed(job: MegatronJob) -> bool:
    """The first K layers of a legacy checkpoint run at PP 1 in TP ranks (see first_layers.py);
    a torch_dist checkpoint's layers are stacked by their global count, so it runs as saved."""
    return job.kind == "torch" and job.layers is not None


def _strict(model: Any, sd: dict[str, Any], job: MegatronJob, what: str) -> None:
    from reference.verify.mcore_model import final_norm_as_built

    try:
        model.load_state_dict(final_norm_as_built(model, sd), strict=True)
    except RuntimeError as e:
        where = job.files.get("dir") or job.files["0,0,0"]
        raise InputError(f"{where}: megatron-core refused {what}: "
                         f"{str(e).splitlines()[0]}") from None


def _load(job: MegatronJob, device: torch.device) -> list[Any]:
    """This rank's (virtual) stages, built from the args and loaded strictly."""
    from megatron.core import parallel_state as ps

    from reference.verify.mcore_model import build, check_args, te_to_local

    # each expert-parallel rank loads its own file: the same dense tensors, its own experts
    tp_rank, ep_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    args, state = _args(job, tp_rank, ps.get_pipeline_model_parallel_rank(), ep_rank)
    check_args(args, job.files.get("dir") or job.files["0,0,0"])
    if _collapsed(job):
        from reference.verify.first_layers import first_layers_args, first_layers_state

        sd = first_layers_state(args, job.layers, lambda pp_rank: _args(job, tp_rank, pp_rank, ep_rank)[1])
        model = build(first_layers_args(args, job.layers), None, post_process=False)
        _strict(model, te_to_local(sd) if job.layer_spec == "te" else sd, job, f"layers 1..{job.layers}")
        return [model.to(device)]
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    models = [build(args, v if vpp else None) for v in range(vpp or 1)]
    names = ["model"] if vpp is None else [f"model{v}" for v in range(vpp)]
    if job.kind == "torch":
        for name, model in zip(names, models, strict=True):
            _strict(model, te_to_local(state[name]) if job.layer_spec == "te" else state[name], job, name)
    else:
        from megatron.core import dist_checkpointing

        sharded = {name: m.sharded_state_dict() for name, m in zip(names, models, strict=True)}
        try:
            loaded = dist_checkpointing.load(sharded, job.files["dir"])
        except Exception as e:  # megatron-core raises its own CheckpointingException and others
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"{job.files['dir']}: megatron-core's dist_checkpointing.load refused it: "
                             f"{reason}") from None
        for name, model in zip(names, models, strict=True):
            _strict(model, loaded[name], job, name)
    return [m.to(device) for m in models]


def _capture(models: list[Any], layer: int, seen: list[Any]) -> None:
    """Keep the output of global layer `layer` (1-based, megatron's `layer_number`) if held here."""
    for model in models:
        for block in model.decoder.layers:
            if block.layer_number == layer:
                block.register_forward_hook(lambda m, i, out: seen.append(out[0] if isinstance(out, tuple)
                                                                          else out))


def _run(job: MegatronJob, device: torch.device) -> dict[str, Any]:
    """Load, run fp32 then fp64; the answer if this rank holds it (TP rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from reference.converters.megatron.args import layout_from_args

    args, _ = _args(job, 0, 0)
    layout, _ = layout_from_args(args, "args")
    pp, vpp = (1, None) if _collapsed(job) else (layout.pp, layout.vpp)
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp,
                                 expert_model_parallel_size=layout.ep,
                                 expert_tensor_parallel_size=layout.expert_tp)
    if device.type == "cuda":  # attention forks the model-parallel CUDA RNG (dropout 0: it draws nothing)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    out: dict[str, Any] = {}
    try:
        models = _load(job, device)
    except InputError as e:  # the checkpoint: one line for the CLI
        out["error"] = str(e).strip().splitlines()[0]
    except Exception:  # a bug: the whole story
        out["crash"] = traceback.format_exc()
    ok = torch.tensor([0 if out else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank stops if one failed: no hang
    if not ok.item():
        ps.destroy_model_parallel()
        return out
    from reference.verify.mcore_model import forward

    ids = torch.tensor(job.ids, device=device)
    seen: list[Any] = []
    if job.layers is not None:
        _capture(models, job.layers, seen)
    # TP ranks hold the same hidden states; data-parallel copies (the EP ranks, outside the
    # experts) compute the same answer: TP rank 0 of the first copy returns it
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    for name in DTYPES:
        dtype = getattr(torch, name)
        for m in models:
            m.to(dtype)
            m.config.params_dtype = m.config.pipeline_dtype = dtype
        seen.clear()
        shard = forward(models, ids, dtype)
        if job.layers is not None:
            if seen and first:
                out[name] = seen[0].transpose(0, 1).cpu()  # (S, B, H) -> (B, S, H)
        elif shard is not None:
            pieces = [torch.empty_like(shard) for _ in range(layout.tp)]
            dist.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
            if first:
                out[name] = torch.cat(pieces, dim=-1)[..., : job.vocab_size].cpu()
    ps.destroy_model_parallel()
    return out
