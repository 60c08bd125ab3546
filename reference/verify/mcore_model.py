"""megatron-core's GPTModel built from a checkpoint's own `args`, as Megatron-LM's
`pretrain_gpt.py` builds it, and its pipeline stages driven by hand.

Runs inside a rank process whose model-parallel groups are set up (see `mcore_ranks.py`):
megatron-core's pipeline schedules allocate on CUDA, so the stages send and receive their
activations themselves. Tests use the same builder to prove our converted files load strictly.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from reference.converters.megatron.args import either
from reference.errors import InputError
from reference.verify.cpu import CPU_CONFIG

# The local spec's linears whose (None) extra state a TransformerEngine checkpoint also has.
_TE_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")


def te_to_local(model: dict[str, Any]) -> dict[str, Any]:
    """A TransformerEngine-spec state dict in the local spec's names: the fused norms move back
    to their own modules; TE's extra states go, the local linears' (None) stay."""
    out: dict[str, Any] = {}
    for key, value in model.items():
        key = key.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
        key = key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
        if key.endswith("._extra_state"):
            if not key.removesuffix("._extra_state").endswith(_TE_LINEARS):
                continue  # core_attention, norms: TE modules the local spec does not have
            value = None
        out[key] = value
    return out


_FINAL_NORM_EXTRA = "decoder.final_layernorm._extra_state"


def final_norm_as_built(model: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """A rank file's state dict with the final norm's extra state as this build of megatron-core
    has it: where TransformerEngine is installed a dense model's final norm is TE's, which has
    one (reference/converters/megatron/keys.py FINAL_NORM), elsewhere it has none. Megatron-LM's
    strict load fails on that key either way and its non-strict retry loads every weight; its
    only content is FP8 scaling metadata, which an fp32 run does not use."""
    import torch

    wants = _FINAL_NORM_EXTRA in model.state_dict()
    if wants and _FINAL_NORM_EXTRA not in sd:
        return {**sd, _FINAL_NORM_EXTRA: torch.empty(0, dtype=torch.uint8)}  # TE's "no FP8"
    if not wants and _FINAL_NORM_EXTRA in sd:
        return {k: v for k, v in sd.items() if k != _FINAL_NORM_EXTRA}
    return sd


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


# How tokens travel to their experts, not what the experts compute: a checkpoint trained with
# the alltoall or flex dispatcher, overlapped shared experts or TE's fused permutation computes
# the same function with megatron-core's allgather dispatcher, unfused, which alone runs without
# CUDA streams and events (and without TransformerEngine).
MOE_RUNTIME = {"moe_token_dispatcher_type": "allgather", "moe_shared_expert_overlap": False,
               "moe_permute_fusion": False}


def moe_config(args: Namespace) -> dict[str, Any]:
    """TransformerConfig's MoE fields from checkpoint args (none for a dense model)."""
    if not getattr(args, "num_experts", None):
        return {}
    return {"num_moe_experts": args.num_experts, **{f: getattr(args, f) for f in MOE_FIELDS},
            **MOE_RUNTIME}


# MLATransformerConfig fields a checkpoint's latent-attention args set under their own name (as
# Megatron-LM's core_transformer_config_from_args copies them, taking MLATransformerConfig).
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
              "rotary_scaling_factor", "mscale", "mscale_all_dim", "original_max_position_embeddings",
              "beta_fast", "beta_slow")


def mla_config(args: Namespace) -> dict[str, Any]:
    """MLATransformerConfig's latent-attention fields from checkpoint args (none without MLA)."""
    if not getattr(args, "multi_latent_attention", False):
        return {}
    fields = {f: getattr(args, f) for f in MLA_FIELDS if getattr(args, f, None) is not None}
    # q_lora_rank None is one q projection (V2-Lite): unset, MLATransformerConfig's 1536 would be taken
    return {"rotary_base": getattr(args, "rotary_base", 10000), "rope_type": "yarn", **fields,
            "q_lora_rank": getattr(args, "q_lora_rank", None)}


def latent_core_attention() -> type:
    """megatron-core's DotProductAttention as its local MLA spec needs it. In 0.16.1,
    MultiLatentAttention.__init__ builds core_attention with k_channels and v_channels (query and
    key heads of qk_head_dim + qk_pos_emb_head_dim, value heads of v_head_dim), which only
    TransformerEngine's TEDotProductAttention takes: the local spec's DotProductAttention raises
    TypeError on construction. This subclass takes them and sizes its output by v_channels; the
    forward, scale and mask are DotProductAttention's own (it reads the q/k/v widths from the
    tensors, and MLA passes its softmax_scale)."""
    import copy

    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LatentDotProductAttention(DotProductAttention):
        def __init__(self, config: Any, *args: Any, k_channels: int | None = None,
                     v_channels: int | None = None, **kwargs: Any) -> None:
            # Attention.__init__ builds one without them first; MultiLatentAttention replaces it
            if v_channels is not None:
                config = copy.copy(config)
                config.kv_channels = v_channels  # the output: heads x v_head_dim
                assert kwargs.get("softmax_scale") is not None, "MLA passes its own q.k scale"
            super().__init__(config, *args, **kwargs)

    return LatentDotProductAttention


def _with_latent_core_attention(spec: Any) -> Any:
    """A GPT layer or block spec whose MLA layers use `latent_core_attention()`."""
    import copy

    spec = copy.deepcopy(spec)
    core = latent_core_attention()
    for layer in getattr(spec, "layer_specs", None) or [spec]:  # a block spec's layers, or one layer's
        layer.submodules.self_attention.submodules.core_attention = core
    return spec


def check_args(args: Namespace, where: str) -> None:
    """Refuse, by name, args this builder does not reproduce."""
    if not getattr(args, "swiglu", False):
        raise InputError(f"{where}: args without swiglu: only SwiGLU GPT models are built")
    if getattr(args, "position_embedding_type", "learned_absolute") != "rope":
        raise InputError(f"{where}: args position_embedding_type "
                         f"{getattr(args, 'position_embedding_type', None)!r}: only rope is built")


def build(args: Namespace, vp_stage: int | None, post_process: bool | None = None) -> Any:
    """GPTModel of one (virtual) pipeline stage, fp32, eval mode, on the CPU; `post_process`
    False leaves out the final norm and output layer of a last stage (it returns hidden states)."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    group = getattr(args, "group_query_attention", False)
    latent = getattr(args, "multi_latent_attention", False)
    config = (MLATransformerConfig if latent else TransformerConfig)(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if group else None,
        kv_channels=getattr(args, "kv_channels", None),
        layernorm_epsilon=either(args, "norm_epsilon", 1e-5, "megatron args"),
        normalization=getattr(args, "normalization", "LayerNorm"),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=getattr(args, "add_bias_linear", True),
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=getattr(args, "virtual_pipeline_model_parallel_size", None),
        pipeline_model_parallel_layout=getattr(args, "pipeline_model_parallel_layout", None),
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_CONFIG,
        **moe_config(args),
        **mla_config(args),
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    if config.num_moe_experts:  # per-layer specs, MoE or dense by moe_layer_freq, as Megatron-LM's
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=config.normalization, vp_stage=vp_stage)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization,
                                        multi_latent_attention=latent)
    if latent:
        spec = _with_latent_core_attention(spec)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=(ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
                      if post_process is None else post_process),
        share_embeddings_and_output_weights=not getattr(args, "untie_embeddings_and_output_weights", False),
        position_embedding_type="rope",
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_base=getattr(args, "rotary_base", 10000),
        rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        vp_stage=vp_stage,
    ).to(torch.float32).eval()


def forward(models: list[Any], ids: Any, dtype: Any = None) -> Any:
    """Run the (virtual) stages of this rank in pipeline order, sending and receiving between
    ranks; the last stage returns its vocab shard of the logits `(B, S, V_padded / tp)`, every
    other rank None."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = ids.shape
    pp, me = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    hidden = models[0].config.hidden_size
    position_ids = torch.arange(s, device=ids.device).expand(b, s)
    # megatron-core's default mask is built on CUDA: always pass one (True = masked)
    causal = torch.triu(torch.ones(s, s, device=ids.device), diagonal=1).bool()[None, None]
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
                h = torch.empty(s, b, hidden, dtype=dtype or torch.float32, device=ids.device)
                dist.recv(h, ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(h)
                x = model(None, position_ids, attention_mask=causal)
            if c < stages - 1:
                dist.send(x.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            else:
                out = x
    return out
