"""Every family this project knows, one row each.

Rows with `keys=None` are recognised from config.json and refused by name wherever a target
cannot express them; their tensor layouts arrive with the unified model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reference.errors import InputError
from reference.families.config import (
    LLAMA_FIELDS,
    AttentionScale,
    BaichuanPositions,
    DeepSeekExperts,
    Derived,
    Experts,
    Fixed,
    Flag,
    Grouped,
    Implied,
    Implies,
    Latent,
    LayerTypeRope,
    LegacyRope,
    LongContext,
    QueryScalar,
    RopeRatio,
    RotaryFraction,
    Scaled,
    Unsupported,
    Value,
    Window,
)
from reference.families.family import Family
from reference.families.keymap import (
    BAICHUAN_KEYS,
    CHATGLM_KEYS,
    DEEPSEEK_KEYS,
    GLM4_KEYS,
    GLM_KEYS,
    GPT_NEOX_KEYS,
    GRANITEMOE_KEYS,
    INTERNLM2_KEYS,
    LLAMA_KEYS,
    MIXTRAL_KEYS,
    MOE_KEYS,
    PHI3_KEYS,
    PHI_KEYS,
    POST_NORM_KEYS,
    QWEN_KEYS,
    STABLELM_KEYS,
    STARCODER2_KEYS,
)

LLAMA_BIAS = (Flag("attention_bias", ("qkv_bias", "o_bias")), Flag("mlp_bias", ("mlp_bias",)))
# Gemma's classes attend to later tokens with it (Gemma3 in every backend, Gemma and Gemma2 under sdpa)
BIDIRECTIONAL = Unsupported("use_bidirectional_attention", False, "attention to later tokens", default=False)
GLM_BIAS = Flag("attention_bias", ("qkv_bias",), default=True)  # q, k and v; o never has one
GEMMA2_FIELDS = {**LLAMA_FIELDS, "hidden_act": "hidden_activation"}
_GEMMA_CODECS = (Fixed("norm_offset", True), Derived("embedding_multiplier", "hidden_size", 0.5),
                 BIDIRECTIONAL, QueryScalar(), Fixed("post_norms", True),
                 Value("final_softcap", "final_logit_softcapping"), Window(mixed_layers=True))
GEMMA2_CODECS = (*_GEMMA_CODECS, Value("attn_softcap", "attn_logit_softcapping"))
# Gemma3's attention never applies its config's attn_logit_softcapping, so it is not read.
GEMMA3_CODECS = (*_GEMMA_CODECS, Fixed("qk_norm", True), LayerTypeRope())
LAYERNORM_FIELDS = {**LLAMA_FIELDS, "norm_eps": "layer_norm_eps"}
# ChatGLM2 / ChatGLM3 / GLM-4 remote code: GLM's computation (half rotary on interleaved pairs).
CHATGLM_FIELDS = {"vocab_size": "padded_vocab_size", "hidden_size": "hidden_size",
                  "intermediate_size": "ffn_hidden_size", "num_layers": "num_layers",
                  "num_heads": "num_attention_heads", "head_dim": "kv_channels",
                  "max_position_embeddings": "seq_length", "norm_eps": "layernorm_epsilon",
                  "tie_word_embeddings": "tie_word_embeddings"}
CHATGLM_CODECS = (
    Grouped("multi_query_attention", "multi_query_group_num"),
    Implies("add_qkv_bias", "qkv_bias", by="add_bias_linear", by_features=("o_bias", "mlp_bias")),
    Flag("add_bias_linear", ("o_bias", "mlp_bias")),
    Fixed("rotary_fraction", 0.5), Fixed("interleaved_rope", True), RopeRatio(),
    # the published code never reads original_rope: both values compute the same
    Unsupported("rmsnorm", True, "LayerNorm instead of RMSNorm", default=True),
    Unsupported("apply_residual_connection_post_layernorm", False, "the residual taken after the norm",
                default=False),
    Unsupported("post_layer_norm", True, "no final norm", default=True),
    Unsupported("position_encoding_2d", None, "ChatGLM-6B v1's 2D positions"),
)
DEEPSEEK_NO_BIAS = (
    Unsupported("attention_bias", False, "biases on latent attention's projections", default=False),
    Unsupported("mlp_bias", False, "biases on the dense MLP and the shared experts", default=False))
NO_HEAD_DIM = {k: v for k, v in LAYERNORM_FIELDS.items() if k != "head_dim"}  # head_dim = hidden / heads

ROWS = (
    Family(model_type="llama", architecture="LlamaForCausalLM", keys=LLAMA_KEYS, codecs=LLAMA_BIAS),
    Family(model_type="qwen2", architecture="Qwen2ForCausalLM", keys=LLAMA_KEYS,
           codecs=(Fixed("qkv_bias", True), Window(switch="use_sliding_window", mixed_layers=True))),
    Family(model_type="qwen3", architecture="Qwen3ForCausalLM", keys=LLAMA_KEYS,
           codecs=(LLAMA_BIAS[0], Fixed("qk_norm", True),
                   Window(switch="use_sliding_window", mixed_layers=True))),
    Family(model_type="mistral", architecture="MistralForCausalLM", keys=LLAMA_KEYS,
           codecs=(Window(),)),
    Family(model_type="phi3", architecture="Phi3ForCausalLM", keys=PHI3_KEYS,
           codecs=(RotaryFraction(), Window())),
    Family(model_type="gemma", architecture="GemmaForCausalLM", keys=LLAMA_KEYS, tie_default=True,
           codecs=(LLAMA_BIAS[0], Fixed("norm_offset", True),
                   Derived("embedding_multiplier", "hidden_size", 0.5), BIDIRECTIONAL)),
    # Checkpoint layouts with no class in transformers (trust_remote_code in the wild).
    Family(model_type="baichuan", architecture="BaichuanForCausalLM", keys=BAICHUAN_KEYS,
           codecs=(Fixed("normalized_head", True), BaichuanPositions(), LegacyRope())),
    Family(model_type="internlm2", architecture="InternLM2ForCausalLM", keys=INTERNLM2_KEYS,
           codecs=(Flag("bias", ("qkv_bias", "o_bias")), LegacyRope())),
    Family(model_type="qwen", architecture="QWenLMHeadModel", keys=QWEN_KEYS,
           fields={"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                   "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
                   "num_heads": "num_attention_heads", "head_dim": "kv_channels",
                   "max_position_embeddings": "max_position_embeddings", "norm_eps": "layer_norm_epsilon",
                   "tie_word_embeddings": "tie_word_embeddings"},
           codecs=(Scaled("intermediate_size", "intermediate_size", 2), Fixed("qkv_bias", True),
                   LegacyRope("rotary_emb_base"), LongContext(), Implied("num_kv_heads"))),
    Family(model_type="chatglm", architecture="ChatGLMModel", keys=CHATGLM_KEYS, fields=CHATGLM_FIELDS,
           codecs=CHATGLM_CODECS),
    Family(model_type="granite", architecture="GraniteForCausalLM", keys=LLAMA_KEYS,
           codecs=(*LLAMA_BIAS, Value("embedding_multiplier", "embedding_multiplier", 1.0),
                   AttentionScale("attention_multiplier", "attention_multiplier", 1.0),
                   Value("residual_multiplier", "residual_multiplier", 1.0),
                   Value("logits_divisor", "logits_scaling", 1.0))),
    Family(model_type="gemma2", architecture="Gemma2ForCausalLM", keys=POST_NORM_KEYS,
           fields=GEMMA2_FIELDS, tie_default=True, codecs=(LLAMA_BIAS[0], *GEMMA2_CODECS)),
    Family(model_type="olmo2", architecture="Olmo2ForCausalLM", keys=POST_NORM_KEYS,
           codecs=(LLAMA_BIAS[0], Fixed("pre_norms", False), Fixed("post_norms", True),
                   Fixed("qk_norm", True), Fixed("qk_norm_scope", "all"))),
    Family(model_type="gemma3_text", architecture="Gemma3ForCausalLM", keys=POST_NORM_KEYS,
           fields=GEMMA2_FIELDS, tie_default=True,
           codecs=(LLAMA_BIAS[0], *GEMMA3_CODECS)),
    Family(model_type="glm", architecture="GlmForCausalLM", keys=GLM_KEYS,
           codecs=(GLM_BIAS, RotaryFraction(0.5), Fixed("interleaved_rope", True))),
    Family(model_type="glm4", architecture="Glm4ForCausalLM", keys=GLM4_KEYS,
           codecs=(GLM_BIAS, RotaryFraction(0.5), Fixed("interleaved_rope", True),
                   Fixed("post_norms", True))),
    # LayerNorm families: parallel blocks off one norm or two, non-gated MLPs, biases.
    Family(model_type="cohere", architecture="CohereForCausalLM", keys=LLAMA_KEYS, tie_default=True,
           fields=LAYERNORM_FIELDS,
           codecs=(LLAMA_BIAS[0], Fixed("layernorm", True), Fixed("norm_moments", True),
                   Fixed("parallel_block", True), Fixed("shared_norm", True), Fixed("interleaved_rope", True),
                   Value("logit_scale", "logit_scale", 0.0625), Flag("use_qk_norm", ("qk_norm",)),
                   Fixed("qk_norm_scope", "each_head"))),
    Family(model_type="stablelm", architecture="StableLmForCausalLM", keys=STABLELM_KEYS,
           fields=NO_HEAD_DIM,
           codecs=(Fixed("layernorm", True), Fixed("norm_bias", True), RotaryFraction(),
                   Flag("use_qkv_bias", ("qkv_bias",)), Flag("qk_layernorm", ("qk_norm",)),
                   Fixed("qk_norm_scope", "each_head"),
                   Flag("use_parallel_residual", ("parallel_block", "shared_norm")), Implied("head_dim"))),
    Family(model_type="starcoder2", architecture="Starcoder2ForCausalLM", keys=STARCODER2_KEYS,
           tie_default=True, fields={**LLAMA_FIELDS, "norm_eps": "norm_epsilon"},
           codecs=(Fixed("layernorm", True), Fixed("norm_bias", True), Fixed("gated_mlp", False), Window(),
                   Flag("use_bias", ("qkv_bias", "o_bias", "mlp_bias")))),
    Family(model_type="phi", architecture="PhiForCausalLM", keys=PHI_KEYS, fields=NO_HEAD_DIM,
           codecs=(*(Fixed(f, True) for f in ("layernorm", "norm_bias", "parallel_block", "shared_norm",
                                              "branches_first", "qkv_bias", "o_bias", "mlp_bias",
                                              "lm_head_bias")),
                   Fixed("gated_mlp", False), RotaryFraction(), Flag("qk_layernorm", ("qk_norm",)),
                   Fixed("qk_norm_bias", True), Implied("head_dim"))),
    Family(model_type="gpt_neox", architecture="GPTNeoXForCausalLM", keys=GPT_NEOX_KEYS,
           fields={k: v for k, v in NO_HEAD_DIM.items() if k != "num_kv_heads"},
           codecs=(Fixed("layernorm", True), Fixed("norm_bias", True), Fixed("gated_mlp", False),
                   Fixed("mlp_bias", True), Flag("attention_bias", ("qkv_bias", "o_bias"), default=True),
                   Flag("use_parallel_residual", ("parallel_block",), default=True),
                   Fixed("branches_first", True), RotaryFraction(),
                   Implied("head_dim"), Implied("num_kv_heads"))),
    Family(model_type="olmo", architecture="OlmoForCausalLM", keys=LLAMA_KEYS,
           fields={k: v for k, v in LLAMA_FIELDS.items() if k != "norm_eps"},
           codecs=(LLAMA_BIAS[0], Fixed("layernorm", True), Fixed("norm_params", False),
                   Implied("norm_eps", 1e-5), Value("clip_qkv", "clip_qkv"))),
    # Mixtures of experts
    Family(model_type="mixtral", architecture="MixtralForCausalLM", keys=MIXTRAL_KEYS,
           codecs=(Experts("num_local_experts", "intermediate_size", 8, renormalise=True, fp32_weights=True),
                   Window())),
    # GraniteMoE: granite's multipliers and Mixtral's mixture (softmax over the top-k logits is
    # the full softmax renormalised over them), each layer's experts stacked in two tensors.
    Family(model_type="granitemoe", architecture="GraniteMoeForCausalLM", keys=GRANITEMOE_KEYS,
           codecs=(LLAMA_BIAS[0], Value("embedding_multiplier", "embedding_multiplier", 1.0),
                   AttentionScale("attention_multiplier", "attention_multiplier", 1.0),
                   Value("residual_multiplier", "residual_multiplier", 1.0),
                   Value("logits_divisor", "logits_scaling", 1.0),
                   Experts("num_local_experts", "intermediate_size", 8, renormalise=True))),
    Family(model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", keys=MOE_KEYS,
           codecs=(Fixed("qkv_bias", True),
                   Experts("num_experts", "moe_intermediate_size", 60, renormalise="norm_topk_prob",
                           shared="shared_expert_intermediate_size", layers=True),
                   Window(switch="use_sliding_window", mixed_layers=True))),
    Family(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", keys=MOE_KEYS,
           codecs=(LLAMA_BIAS[0], Fixed("qk_norm", True),
                   # transformers 5.x saves num_local_experts; published configs say num_experts
                   Experts("num_local_experts", "moe_intermediate_size", 128, renormalise="norm_topk_prob",
                           layers=True, count_also="num_experts"),
                   Window(switch="use_sliding_window"))),
    # OLMoE: OLMo2's q/k norm over all heads, then OLMo's clip; a pre-norm block; head_dim is
    # hidden / heads (the norms span hidden_size)
    Family(model_type="olmoe", architecture="OlmoeForCausalLM", keys=MOE_KEYS,
           fields={k: v for k, v in LLAMA_FIELDS.items() if k != "head_dim"},
           codecs=(LLAMA_BIAS[0], Fixed("qk_norm", True), Fixed("qk_norm_scope", "all"),
                   Value("clip_qkv", "clip_qkv"), Fixed("clip_after_qk_norm", True), Implied("head_dim"),
                   Experts("num_experts", "intermediate_size", 64, renormalise="norm_topk_prob"))),
    # DeepSeek: latent attention (V2 rotates interleaved pairs always, V3 as rope_interleave
    # says) and DeepSeek's routing; biases on MLA's projections are not held yet.
    Family(model_type="deepseek_v2", architecture="DeepseekV2ForCausalLM", keys=DEEPSEEK_KEYS,
           codecs=(*DEEPSEEK_NO_BIAS, Latent(), Fixed("interleaved_rope", True), Fixed("fp32_rope", True),
                   DeepSeekExperts(64, "softmax", "max", grouped_by="group_limited_greedy", choice_bias=False,
                                   renormalise=False))),
    Family(model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM", keys=DEEPSEEK_KEYS,
           codecs=(DEEPSEEK_NO_BIAS[0], Latent(),
                   Flag("rope_interleave", ("interleaved_rope",), default=True),
                   DeepSeekExperts(256, "sigmoid", "top2", grouped_by=None, choice_bias=True,
                                   renormalise=True))),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in ROWS}


def family_named(name: str) -> Family:
    """The family registered under a model_type; an unknown one raises, listing the known."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise InputError(f"unknown model family '{name}' (known: {known})") from None


def family_of(cfg: Mapping[str, Any], where: str) -> Family:
    """The family of an HF config, from its model_type."""
    if "model_type" not in cfg:
        raise InputError(f"{where}: no 'model_type' field")
    try:
        return family_named(cfg["model_type"])
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
