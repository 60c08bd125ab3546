"""Converted checkpoints run in the real megatron-core GPTModel: ranks under gloo on the CPU.

One process group per world size runs every case of that size: for each, it sets up the
model-parallel groups, builds GPTModel from the checkpoint's own `args` (as Megatron-LM's
`pretrain_gpt.py` would), loads each rank's file with `strict=True`, drives the pipeline
stages by hand (send/recv; megatron's schedules allocate on CUDA) and, on the last stage,
gathers the vocab-parallel logits for the parent to compare with the HF model's.

The CUDA side-steps live in tests/mcore_cpu.py, in test code only.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from mcore_cpu import CPU_CONFIG, side_steps
from procs import join_gloo

TIMEOUT_S = 120


def te_to_local(model: dict[str, Any]) -> dict[str, Any]:
    """A TransformerEngine-spec state dict in the local spec's names: the fused norms move back
    to their own modules; TE's extra states go, the local linears' (None) stay."""
    out: dict[str, Any] = {}
    for key, value in model.items():
        key = key.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
        key = key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
        if key.endswith("._extra_state"):
            module = key.removesuffix("._extra_state")
            if not module.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")):
                continue  # core_attention, norms: TE modules the local spec does not have
            value = None
        out[key] = value
    return out


# TransformerConfig fields a checkpoint's MoE args set under their own name (Megatron-LM's
# core_transformer_config_from_args copies every args field a TransformerConfig has).
MOE_FIELDS = ("moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
              "moe_shared_expert_gate", "moe_shared_expert_overlap", "moe_layer_freq",
              "moe_router_pre_softmax", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
              "moe_z_loss_coeff", "moe_input_jitter_eps",
              "moe_router_dtype", "moe_token_dispatcher_type", "moe_permute_fusion", "moe_router_fusion",
              "moe_router_score_function", "moe_router_topk_scaling_factor", "moe_router_num_groups",
              "moe_router_group_topk", "moe_router_enable_expert_bias", "moe_expert_capacity_factor",
              "moe_grouped_gemm", "moe_router_force_load_balancing", "moe_apply_probs_on_input",
              "expert_model_parallel_size", "expert_tensor_parallel_size")


def moe_config(args: Any) -> dict[str, Any]:
    """TransformerConfig's MoE fields from checkpoint args (none for a dense model)."""
    if not getattr(args, "num_experts", None):
        return {}
    return {"num_moe_experts": args.num_experts, **{f: getattr(args, f) for f in MOE_FIELDS}}


def _build(args: Any, vp_stage: int | None) -> Any:
    """GPTModel for one (virtual) stage from checkpoint args, as Megatron-LM builds it."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    assert args.swiglu and args.position_embedding_type == "rope"
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        layernorm_epsilon=args.norm_epsilon,
        normalization=args.normalization,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        **CPU_CONFIG,
        **moe_config(args),
        params_dtype=args.params_dtype,
        pipeline_dtype=args.params_dtype,
    )
    if config.num_moe_experts:  # per-layer specs, MoE or dense by moe_layer_freq, as Megatron-LM's
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=args.normalization, vp_stage=vp_stage)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        vp_stage=vp_stage,
    ).to(torch.float32).eval()


def world_of(case: dict[str, Any]) -> int:
    """Ranks a case runs on: TP x PP x EP (experts' TP equal to TP, data parallel = EP)."""
    return case["tp"] * case["pp"] * case.get("ep", 1)


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
        model = _build(args, v if vpp else None)
        sd = state["model" if vpp is None else f"model{v}"]
        model.load_state_dict(te_to_local(sd) if case["te"] else sd, strict=True)
        models.append(model)
    return models


def _forward(models: list[Any], ids: Any, hidden_size: int) -> Any:
    """Run the virtual stages in pipeline order; the last one returns its logits shard."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = ids.shape
    pp, me = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    position_ids = torch.arange(s).expand(b, s)
    causal = torch.triu(torch.ones(s, s), diagonal=1).bool()[None, None]  # True = masked
    stages = pp * len(models)
    out = None
    with torch.no_grad():
        for c in range(stages):
            if c % pp != me:
                continue
            model = models[c // pp]
            if c == 0:
                x = model(ids, position_ids, attention_mask=causal)
            else:
                h = torch.empty(s, b, hidden_size)
                dist.recv(h, ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(h)
                x = model(None, position_ids, attention_mask=causal)
            if c < stages - 1:
                dist.send(x.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            else:
                out = x  # (B, S, V_padded / tp)
    return out


def _case(case: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=case["tp"],
                                 pipeline_model_parallel_size=case["pp"],
                                 virtual_pipeline_model_parallel_size=case["vpp"],
                                 expert_model_parallel_size=case.get("ep", 1))
    result: dict[str, Any] = {"error": None, "compared": False}
    try:
        models = _load(case)
    except Exception:
        result["error"] = traceback.format_exc(limit=-3)
    ok = torch.tensor([result["error"] is None], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips the forward if one failed
    if ok.item():
        ref = torch.load(case["ref"])
        shard = _forward(models, ref["input_ids"], models[0].config.hidden_size)
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


def run_group(rank: int, world: int, port: int, cases_file: str, out_dir: str) -> None:
    """Entry point of one rank: every case of this world size, results to out_dir/rank{N}.json."""
    import torch.distributed as dist

    join_gloo(rank, world, port, TIMEOUT_S)
    side_steps()
    cases = [c for c in json.loads(Path(cases_file).read_text()) if world_of(c) == world]
    results = {c["id"]: _case(c) for c in cases}
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
                                     pipeline_model_parallel_size=case["pp"])
        models = _load(case)
        args = torch.load(_rank_file(case, 0, 0), weights_only=False)["args"]
        root = Path(case["dist"])
        where = root / "iter_0000001"
        where.mkdir(parents=True, exist_ok=True)  # the target must exist before save
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 1,
                 "model": models[0].sharded_state_dict()}
        dist_checkpointing.save(state, str(where))
        if rank == 0:
            (root / "latest_checkpointed_iteration.txt").write_text("1")
        dist.barrier()
        ps.destroy_model_parallel()
    dist.destroy_process_group()
