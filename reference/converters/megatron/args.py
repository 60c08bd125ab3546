"""The `args` Namespace a Megatron-LM checkpoint carries, and the ModelSpec it describes.

Megatron-LM compares some of these with its command line and, under `--use-checkpoint-args`,
takes the rest from here: a checkpoint without `rotary_base` would train with 10000. So every
hyper-parameter that changes what the model computes is written, as a plain value.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from reference.converters.megatron.layout import (
    MegatronLayout,
    layout_string,
    padded_vocab,
    parse_layout_string,
)
from reference.errors import Inexpressible, InputError
from reference.families.spec import MLA, ModelSpec, MoE, layer_spelling

if TYPE_CHECKING:  # imported where the args are built: `reference families` asks `refuses` only
    import torch

# Megatron-Core's Llama-3 rope scaling fixes these (RotaryEmbedding._apply_scaling).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TRANSFORMER_IMPL = {"local": "local", "te": "transformer_engine"}


def refuses(spec: ModelSpec) -> dict[str, str]:
    """Fields of the spec's dimensions Megatron-Core cannot compute, each with why."""
    out: dict[str, str] = {}
    if spec.hidden_act != "silu":
        out["hidden_act"] = f"the model uses {spec.hidden_act!r}; Megatron-LM's gated MLP is SwiGLU (silu)"
    try:
        rope_args(spec.rope_parameters, latent=spec.mla is not None)
    except Inexpressible as e:
        out["rope_parameters"] = e.detail
    out.update(_latent_refusals(spec))
    if spec.num_experts and spec.moe is None:
        out["num_experts"] = "routing the spec does not describe; megatron-core's router is not matched to it"
    elif spec.moe is not None and (why := routing_refusal(spec.moe, spec.num_experts)):
        out["moe"] = why
    return out


def _latent_refusals(spec: ModelSpec) -> dict[str, str]:
    """What megatron-core's MLA computes otherwise than the spec: it rotates interleaved pairs
    (rope_utils: MLA de-interleaves before rotating), and its latent norms take the model's
    layernorm_epsilon. Without MLA, Megatron-LM's rope here rotates halves."""
    m = spec.mla
    if m is None:
        plain = {"interleaved_rope": "rope on interleaved pairs", "fp32_rope": "rope rotated in fp32"}
        return {f: f"{why}: written for latent attention only"
                for f, why in plain.items() if getattr(spec, f)}
    out = {}
    if spec.rotary_fraction != 1.0:
        out["rotary_fraction"] = "partial rope in latent attention: its rope part is all rope"
    if not spec.interleaved_rope:
        out["interleaved_rope"] = ("rope on halves (rope_interleave=False); megatron-core's latent attention "
                                   "rotates interleaved pairs")
    if m.norm_eps != spec.norm_eps:
        out["norm_eps"] = (f"norm_eps {spec.norm_eps} beside latent norms of eps {m.norm_eps}; "
                           "megatron-core's q/kv layernorms take the model's layernorm_epsilon")
    return out


# The group score megatron-core computes, by topk // group_topk (moe_utils.group_limited_topk
# sums each group's best topk // group_topk scores): the spec's "max" is a sum of one, "top2" of two.
GROUP_SCORE = {1: "max", 2: "top2"}


def routing_refusal(m: MoE, experts: int) -> str | None:
    """Why megatron-core's TopKRouter (moe_utils.topk_routing_with_score_function, unfused)
    routes otherwise than the spec, or None where it computes the same choice and weights."""
    if m.choice_bias and m.scoring != "sigmoid":
        return "choice_bias=True on softmax scores; megatron-core adds expert_bias to sigmoid scores only"
    if m.scoring == "sigmoid" and m.norm_topk_prob != (m.top_k > 1):
        return (f"scoring='sigmoid' with norm_topk_prob={m.norm_topk_prob} and top_k={m.top_k}; "
                "megatron-core renormalises sigmoid weights exactly when top_k > 1")
    if m.groups > 1:
        per = m.top_k // m.top_groups
        if GROUP_SCORE.get(per) != m.group_score:
            score = {"max": "its best expert", "top2": "its best two experts"}[m.group_score]
            return (f"groups={m.groups} scored by {score} (group_score={m.group_score!r}) with "
                    f"top_k={m.top_k}, top_groups={m.top_groups}: megatron-core sums each group's best "
                    f"top_k // top_groups = {per}")
        if m.scoring == "softmax" and m.norm_topk_prob:
            return (f"groups={m.groups} over renormalised softmax weights (norm_topk_prob=True); "
                    "megatron-core then chooses groups by the raw logits")
        if m.top_groups * (experts // m.groups) < m.top_k:
            return f"top_groups={m.top_groups} of {m.groups} groups hold fewer than top_k={m.top_k} experts"
    return None


# megatron-core router options that change which experts a token reaches or their weights, at
# the only values that compute what the HF families here do (no capacity, per-expert linears,
# weights on the outputs); the routing itself (score function, groups, expert bias, scaling,
# router dtype) is read by `moe_from_args`. A checkpoint with any other is refused by name.
ROUTER_FIXED: dict[str, Any] = {
    "moe_expert_capacity_factor": None,
    "moe_grouped_gemm": False,  # GroupedMLP stores experts as one tensor: not these keys
    "moe_router_force_load_balancing": False,  # random logits, for benchmarks
    "moe_apply_probs_on_input": False,  # weights scale the expert's input, not its output
    "moe_router_fusion": False,  # TransformerEngine's fused top-k
}


def moe_args(spec: ModelSpec, layout: MegatronLayout) -> dict[str, Any]:
    """Megatron-LM's MoE arguments for `spec` (none for a dense model). megatron-core's
    top-k routing (moe_utils.topk_routing_with_score_function) with pre-softmax is HF's
    softmax-then-top-k without renormalisation (Qwen2-MoE's norm_topk_prob false); without it,
    top-k of the logits then softmax over those k, which is softmax-then-top-k renormalised
    (Mixtral, Qwen3-MoE): exp(l_i) / sum_k exp(l_k) either way."""
    m = spec.moe
    if m is None:
        return {"num_experts": None, "expert_model_parallel_size": 1,
                "expert_tensor_parallel_size": layout.tp}
    pattern = [int(m.on(i)) for i in range(spec.num_layers)]
    return {
        "num_experts": spec.num_experts,
        "moe_router_topk": m.top_k,
        "moe_ffn_hidden_size": m.expert_size,
        "moe_shared_expert_intermediate_size": m.shared_size or None,
        # Qwen2-MoE gates it by sigmoid(gate(x)); DeepSeek's n_shared_experts are one ungated MLP
        "moe_shared_expert_gate": bool(m.shared_size) and m.gated_shared,
        "moe_shared_expert_overlap": False,
        # HF's decoder_sparse_step counts (i + 1) % step, Megatron's int i % freq: always a list
        "moe_layer_freq": 1 if all(pattern) else pattern,
        "moe_router_pre_softmax": not m.norm_topk_prob,
        "moe_router_load_balancing_type": "aux_loss",  # training only; the forward ignores it
        "moe_aux_loss_coeff": 0.0,
        "moe_z_loss_coeff": None,
        "moe_input_jitter_eps": None,
        "moe_router_dtype": "fp32" if m.fp32_router else None,  # DeepSeek routes in fp32
        "moe_token_dispatcher_type": "allgather",
        "moe_permute_fusion": False,
        **ROUTER_FIXED,
        "moe_router_score_function": m.scoring,
        "moe_router_enable_expert_bias": m.choice_bias,  # V3's e_score_correction_bias, as expert_bias
        "moe_router_num_groups": m.groups if m.groups > 1 else None,
        "moe_router_group_topk": m.top_groups if m.groups > 1 else None,
        "moe_router_topk_scaling_factor": m.scale if m.scale != 1.0 else None,
        "expert_model_parallel_size": layout.ep,
        "expert_tensor_parallel_size": layout.expert_tp,
    }


# The args megatron-core's routing reads, named when a combination of them is refused.
ROUTING_ARGS = ("moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_pre_softmax",
                "moe_router_topk", "moe_router_num_groups", "moe_router_group_topk")


def moe_from_args(args: Namespace, num_layers: int, where: str) -> dict[str, Any]:
    """ModelSpec fields of a checkpoint's MoE args (none for a dense one); routing that
    megatron-core computes differently from every HF family here raises, naming the arg."""
    experts = getattr(args, "num_experts", None)
    if not experts:
        return {}
    for name, want in ROUTER_FIXED.items():
        _require(args, name, want, want, where)
    size = getattr(args, "moe_ffn_hidden_size", None) or _get(args, "ffn_hidden_size", where)
    shared = getattr(args, "moe_shared_expert_intermediate_size", None) or 0
    freq = getattr(args, "moe_layer_freq", 1)
    pattern = [int(i % freq == 0) for i in range(num_layers)] if isinstance(freq, int) else list(freq)
    if len(pattern) != num_layers:
        raise InputError(f"{where}: args moe_layer_freq {freq!r} does not fit num_layers {num_layers}")
    step, dense = layer_spelling([bool(on) for on in pattern])
    pre = getattr(args, "moe_router_pre_softmax", False)
    scoring = getattr(args, "moe_router_score_function", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise InputError(f"{where}: args moe_router_score_function={scoring!r} is not read")
    top_k = _get(args, "moe_router_topk", where)
    groups = getattr(args, "moe_router_num_groups", None)
    top_groups = getattr(args, "moe_router_group_topk", None)
    if bool(groups) != bool(top_groups):  # megatron-core groups only with both
        raise InputError(f"{where}: args moe_router_num_groups={groups!r} with moe_router_group_topk="
                         f"{top_groups!r} is not read (both or neither)")
    group_score = GROUP_SCORE.get(top_k // top_groups) if top_groups else "max"
    if group_score is None:
        raise InputError(f"{where}: args moe_router_group_topk={top_groups!r} with moe_router_topk={top_k}: "
                         "groups scored by their best top_k // group_topk experts summed; only 1 or 2 "
                         "are read")
    router_dtype = getattr(args, "moe_router_dtype", None)
    if router_dtype not in (None, "fp32"):
        raise InputError(f"{where}: args moe_router_dtype={router_dtype!r} is not read (only None or 'fp32')")
    # sigmoid weights are renormalised whenever top_k > 1, whatever moe_router_pre_softmax says
    norm = top_k > 1 if scoring == "sigmoid" else not pre
    moe = MoE(top_k=top_k, expert_size=size, norm_topk_prob=norm, shared_size=shared, sparse_step=step,
              dense_layers=dense, scoring=scoring, groups=groups or 1, top_groups=top_groups or 1,
              group_score=group_score,
              choice_bias=bool(getattr(args, "moe_router_enable_expert_bias", False)),
              scale=float(getattr(args, "moe_router_topk_scaling_factor", None) or 1.0),
              fp32_router=router_dtype == "fp32",
              gated_shared=bool(getattr(args, "moe_shared_expert_gate", False)))
    why = routing_refusal(moe, experts)
    if why:
        said = ", ".join(f"{a}={getattr(args, a, None)!r}" for a in ROUTING_ARGS)
        raise InputError(f"{where}: args {said} route with {why}")
    return {"num_experts": experts, "moe": moe}


def check_heads(spec: ModelSpec) -> None:
    """Megatron-Core groups query heads evenly over the KV heads. (What it cannot compute at
    all is refused earlier, by `refuses`, before anything is written.)"""
    if spec.num_heads % spec.num_kv_heads:
        raise InputError(f"num_attention_heads {spec.num_heads} is not a multiple of "
                             f"num_key_value_heads {spec.num_kv_heads}")


def rope_args(rope: Mapping[str, Any], latent: bool = False) -> dict[str, Any]:
    """Megatron-LM's rope arguments for HF rope parameters (of latent attention's rope part with
    `latent`); others raise."""
    kind = rope.get("rope_type", "default")
    theta = float(rope.get("rope_theta", 10000.0))
    base = int(theta) if theta.is_integer() else theta  # Megatron-LM's --rotary-base is an int
    rest = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    if latent:
        return {"rotary_base": base, "use_rope_scaling": False, "rope_scaling_factor": 8.0,
                **_latent_rope_args(kind, rest)}
    if kind == "default" and not rest:
        return {"rotary_base": base, "use_rope_scaling": False, "rope_scaling_factor": 8.0}
    fixed = {k: rest.get(k) for k in LLAMA3_FIXED}
    if kind == "llama3" and set(rest) == {"factor", *LLAMA3_FIXED} and fixed == LLAMA3_FIXED:
        return {"rotary_base": base, "use_rope_scaling": True, "rope_scaling_factor": float(rest["factor"])}
    raise Inexpressible("megatron", "rope_parameters",
                        f"{dict(rope)}; Megatron-Core computes default rope, and Llama-3 scaling with "
                        f"{LLAMA3_FIXED} only")


# YaRN as DeepSeek's configs give it, all of it, as megatron-core's YarnRotaryEmbedding takes it.
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim")


def _latent_rope_args(kind: str, rest: Mapping[str, Any]) -> dict[str, Any]:
    """MLATransformerConfig's rope fields. Its softmax scale is always multiplied by
    _yarn_get_mscale(rotary_scaling_factor, mscale_all_dim) ** 2, which is 1 at mscale_all_dim 0.
    YaRN is read with every key given and mscale, mscale_all_dim both nonzero: transformers
    scales cos/sin by yarn_get_mscale(factor) alone when either is missing or zero,
    megatron-core always by the ratio of the two."""
    if kind == "default" and not rest:
        return {"rope_type": "rope", "rotary_scaling_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
    if kind == "yarn" and set(rest) == set(YARN_KEYS) and rest["mscale"] and rest["mscale_all_dim"]:
        return {"rope_type": "yarn", "rotary_scaling_factor": float(rest["factor"]),
                "original_max_position_embeddings": int(rest["original_max_position_embeddings"]),
                **{k: float(rest[k]) for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")}}
    raise Inexpressible("megatron", "rope_parameters",
                        f"{dict(rest, rope_type=kind)}; megatron-core's latent attention computes default "
                        f"rope, and YaRN given by all of {', '.join(YARN_KEYS)} with mscale and "
                        "mscale_all_dim nonzero")


def mla_args(spec: ModelSpec) -> dict[str, Any]:
    """Megatron-LM's latent-attention arguments (--multi-latent-attention, --q-lora-rank, ...).
    Its local spec has the latent norms only under --qk-layernorm, which `build_args` sets with them."""
    m = spec.mla
    if m is None:
        return {"multi_latent_attention": False}
    return {"multi_latent_attention": True, "q_lora_rank": m.q_rank, "kv_lora_rank": m.kv_rank,
            "qk_head_dim": m.nope_dim, "qk_pos_emb_head_dim": spec.head_dim, "v_head_dim": m.v_dim}


def mla_from_args(args: Namespace, where: str) -> dict[str, Any]:
    """ModelSpec fields of a checkpoint's latent-attention args (none without them)."""
    if not getattr(args, "multi_latent_attention", False):
        return {}
    _require(args, "qk_layernorm", True, False, where)  # else the local spec has no latent norms
    rope = _get(args, "qk_pos_emb_head_dim", where)
    mla = MLA(q_rank=getattr(args, "q_lora_rank", None), kv_rank=_get(args, "kv_lora_rank", where),
              nope_dim=_get(args, "qk_head_dim", where), v_dim=_get(args, "v_head_dim", where),
              norm_eps=float(either(args, "norm_epsilon", 1e-5, where)))
    heads = _get(args, "num_attention_heads", where)
    return {"latent_attention": True, "mla": mla, "head_dim": rope, "num_kv_heads": heads,
            "qk_norm": False, "interleaved_rope": True}


def _rope_from_args(args: Namespace, where: str) -> dict[str, Any]:
    theta = float(getattr(args, "rotary_base", 10000))
    if getattr(args, "multi_latent_attention", False):
        kind = getattr(args, "rope_type", None) or "yarn"  # Megatron-LM: MLA takes yarn by default
        if kind == "rope":
            # MLA's softmax scale takes YaRN's mscale(rotary_scaling_factor, mscale_all_dim) ** 2
            # whatever the rope type: 1 only at a factor up to 1 or mscale_all_dim 0
            factor, all_dim = (float(getattr(args, k, d) or 0.0) for k, d in (("rotary_scaling_factor", 1.0),
                                                                              ("mscale_all_dim", 0.0)))
            if factor > 1 and all_dim:
                raise InputError(f"{where}: args rope_type='rope' with rotary_scaling_factor={factor} and "
                                 f"mscale_all_dim={all_dim} is not read (megatron-core scales MLA's softmax "
                                 "by YaRN's mscale even without YaRN)")
            return {"rope_type": "default", "rope_theta": theta}
        if kind != "yarn":
            raise InputError(f"{where}: args rope_type={kind!r} is not read")
        return {"rope_type": "yarn", "rope_theta": theta,
                "factor": float(_get(args, "rotary_scaling_factor", where)),
                "original_max_position_embeddings": int(_get(args, "original_max_position_embeddings",
                                                             where)),
                **{k: float(getattr(args, k, d)) for k, d in (("beta_fast", 32.0), ("beta_slow", 1.0),
                                                             ("mscale", 1.0), ("mscale_all_dim", 0.0))}}
    if getattr(args, "use_rope_scaling", False):
        return {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), **LLAMA3_FIXED,
                "rope_theta": theta}
    return {"rope_type": "default", "rope_theta": theta}


def build_args(spec: ModelSpec, layout: MegatronLayout, counts: Sequence[int],
               dtype: torch.dtype) -> Namespace:
    """The args of a checkpoint of `spec` laid out by `layout` (`counts`: layers per virtual stage)."""
    import torch

    even = len(set(counts)) == 1
    return Namespace(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads,
        group_query_attention=spec.num_kv_heads != spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        seq_length=spec.max_position_embeddings,
        position_embedding_type="rope",
        add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_percent=spec.rotary_fraction,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None,
        **rope_args(spec.rope_parameters, latent=spec.mla is not None),
        normalization="RMSNorm",
        # under both the names Megatron-LM has saved them by (SAME_ARG)
        norm_epsilon=spec.norm_eps,
        layernorm_epsilon=spec.norm_eps,
        apply_layernorm_1p=False,
        layernorm_zero_centered_gamma=False,
        swiglu=True,
        squared_relu=False,
        add_bias_linear=spec.o_bias or spec.mlp_bias,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm or spec.mla is not None,
        **mla_args(spec),
        untie_embeddings_and_output_weights=not spec.tie_word_embeddings,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        vocab_size=spec.vocab_size,
        padded_vocab_size=padded_vocab(spec.vocab_size, layout.vocab_divisor, layout.tp),
        make_vocab_size_divisible_by=layout.vocab_divisor,
        tokenizer_type="HuggingFaceTokenizer",
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_virtual_stages_per_pipeline_rank=layout.vpp,
        num_layers_per_virtual_pipeline_stage=counts[0] if layout.vpp and even else None,
        pipeline_model_parallel_layout=None if even else layout_string(counts),
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        transformer_impl=TRANSFORMER_IMPL[layout.layer_spec],
        use_legacy_models=False,
        use_mcore_models=True,
        ckpt_format="torch",
        **moe_args(spec, layout),
    )


# Megatron-LM 0.16 builds its model flags from megatron-core's TransformerConfig, so a flag's
# value is saved under the config field's name: --norm-epsilon as layernorm_epsilon (norm_epsilon
# before), --apply-layernorm-1p as layernorm_zero_centered_gamma (apply_layernorm_1p before).
SAME_ARG = {"norm_epsilon": "layernorm_epsilon", "apply_layernorm_1p": "layernorm_zero_centered_gamma"}


def either(args: Namespace, name: str, default: Any, where: str) -> Any:
    """The value saved under `name` or under its other name in SAME_ARG (`default` under
    neither); two values that differ raise, naming both."""
    names = (name, SAME_ARG[name])
    got = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if len(set(got.values())) > 1:
        a, b = names
        raise InputError(f"{where}: args {a}={got[a]!r} and {b}={got[b]!r} differ")
    return next(iter(got.values()), default)


def _get(args: Namespace, name: str, where: str) -> Any:
    value = getattr(args, name, None)
    if value is None:
        raise InputError(f"{where}: args lack '{name}'")
    return value


def _require(args: Namespace, name: str, want: Any, default: Any, where: str) -> None:
    got = getattr(args, name, default)
    if got != want:
        raise InputError(f"{where}: args {name}={got!r} is not read (only {want!r})")


def spec_from_args(args: Namespace, where: str) -> ModelSpec:
    """The ModelSpec a checkpoint's args describe; what it cannot hold raises, naming the arg.
    Absent args take Megatron-LM's defaults."""
    _require(args, "position_embedding_type", "rope", "learned_absolute", where)
    _require(args, "normalization", "RMSNorm", "LayerNorm", where)
    _require(args, "swiglu", True, False, where)
    if either(args, "apply_layernorm_1p", False, where):
        raise InputError(f"{where}: args apply_layernorm_1p (layernorm_zero_centered_gamma)=True is not read "
                         "(only False)")
    _require(args, "rotary_interleaved", False, False, where)
    _require(args, "rotary_seq_len_interpolation_factor", None, None, where)
    heads, hidden = _get(args, "num_attention_heads", where), _get(args, "hidden_size", where)
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    rope = _rope_from_args(args, where)
    bias = getattr(args, "add_bias_linear", True)  # Megatron-LM's default; --disable-bias-linear
    fields: dict[str, Any] = dict(
        vocab_size=getattr(args, "vocab_size", None) or _get(args, "padded_vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_get(args, "ffn_hidden_size", where),
        num_layers=_get(args, "num_layers", where),
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=getattr(args, "kv_channels", None) or hidden // heads,
        max_position_embeddings=(getattr(args, "max_position_embeddings", None)
                                 or _get(args, "seq_length", where)),
        norm_eps=float(either(args, "norm_epsilon", 1e-5, where)),
        hidden_act="silu",
        rope_parameters=rope,
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
        qkv_bias=bias or getattr(args, "add_qkv_bias", False),
        o_bias=bias,
        mlp_bias=bias,
        qk_norm=getattr(args, "qk_layernorm", False),
        rotary_fraction=float(getattr(args, "rotary_percent", 1.0)),
        **moe_from_args(args, _get(args, "num_layers", where), where),
    )
    return ModelSpec(**{**fields, **mla_from_args(args, where)})


def layout_from_args(args: Namespace, where: str) -> tuple[MegatronLayout, tuple[int, ...]]:
    """The layout args describe, and the layers of every virtual stage they imply."""
    tp = _get(args, "tensor_model_parallel_size", where)
    pp = _get(args, "pipeline_model_parallel_size", where)
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    impl = getattr(args, "transformer_impl", "transformer_engine")
    spec = next((k for k, v in TRANSFORMER_IMPL.items() if v == impl), None)
    if spec is None:
        raise InputError(f"{where}: args transformer_impl={impl!r} is not read")
    layers, stages = _get(args, "num_layers", where), pp * (vpp or 1)
    if getattr(args, "pipeline_model_parallel_layout", None):
        counts = parse_layout_string(str(args.pipeline_model_parallel_layout))
    else:
        counts = _uneven(args, layers, pp, vpp or 1, where)
    if len(counts) != stages or sum(counts) != layers:
        raise InputError(f"{where}: args pipeline layout {counts} does not fit num_layers {layers} "
                             f"over pp {pp} x vpp {vpp or 1}")
    divisor = getattr(args, "make_vocab_size_divisible_by", 128)
    ep = getattr(args, "expert_model_parallel_size", None) or 1
    etp = getattr(args, "expert_tensor_parallel_size", None)
    return MegatronLayout(tp=tp, pp=pp, vpp=vpp, layer_spec=spec, vocab_divisor=divisor, ep=ep,
                          etp=None if etp in (None, tp) else etp), counts


def _uneven(args: Namespace, layers: int, pp: int, chunks: int, where: str) -> tuple[int, ...]:
    """Per-stage layers from Megatron-LM's first/last-stage counts (even when neither is set)."""
    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    ends = [n for n in (first, last) if n is not None]
    middle = pp - len(ends)
    rest = layers - sum(ends)
    if (middle and rest % middle) or (not middle and rest) or any(n % chunks for n in ends):
        raise InputError(f"{where}: args num_layers {layers} does not split over pp {pp} "
                             f"(first {first}, last {last}, vpp {chunks})")
    share = rest // middle if middle else 0
    per_rank = [share] * pp
    if first is not None:
        per_rank[0] = first
    if last is not None:
        per_rank[-1] = last
    if any(n % chunks for n in per_rank):
        raise InputError(f"{where}: args layers per pipeline rank {per_rank} do not split "
                             f"over vpp {chunks}")
    return tuple(per_rank[p] // chunks for _ in range(chunks) for p in range(pp))
