"""Real sizes without real weights: published configs built on the `meta` device. Every
source key is consumed exactly once and every target key produced exactly once, with the
target model's own shapes, both ways through Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from reference.converters.conversion import prepare
from reference.converters.hf_target import HFTarget
from reference.converters.plan import Lazy, plan_target, read_canonical
from reference.converters.safetensors_io import Entry
from reference.converters.source import Source, passthrough
from reference.families.registry import FAMILIES
from reference.families.resolve import as_loaded

_LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}

# Published config.json values (the fields that shape the tensors and the features).
CONFIGS = {
    "Llama-3-8B": {**_LLAMA_7B, "model_type": "llama", "vocab_size": 128256, "intermediate_size": 14336,
                   "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "Yi-6B": {**_LLAMA_7B, "model_type": "llama", "vocab_size": 64000, "num_key_value_heads": 4,
              "rope_theta": 5000000.0},
    "deepseek-llm-7b-base": {**_LLAMA_7B, "model_type": "llama", "vocab_size": 102400,
                             "num_hidden_layers": 30, "rms_norm_eps": 1e-6},
    "Qwen2.5-7B": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "max_position_embeddings": 131072, "rope_theta": 1e6,
                   "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 131072,
                   "max_window_layers": 28, "tie_word_embeddings": False},
    "Mistral-7B-v0.3": {**_LLAMA_7B, "model_type": "mistral", "vocab_size": 32768,
                        "intermediate_size": 14336, "num_key_value_heads": 8,
                        "max_position_embeddings": 32768, "rope_theta": 1e6, "sliding_window": None},
    "Phi-3-mini-4k": {"model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
                      "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 32, "max_position_embeddings": 4096,
                      "original_max_position_embeddings": 4096, "sliding_window": 2047,
                      "rms_norm_eps": 1e-5, "pad_token_id": 32000, "eos_token_id": 32000},
    "Gemma-7B": {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 3072,
                 "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
                 "num_key_value_heads": 16, "head_dim": 256, "max_position_embeddings": 8192,
                 "hidden_act": "gelu", "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "Granite-3-8B": {"model_type": "granite", "vocab_size": 49155, "hidden_size": 4096,
                     "intermediate_size": 12800, "num_hidden_layers": 40, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                     "embedding_multiplier": 12.0, "attention_multiplier": 0.0078125,
                     "residual_multiplier": 0.22, "logits_scaling": 16.0, "tie_word_embeddings": True},
}


def meta_state(config: dict) -> dict[str, torch.Tensor]:
    """The state dict transformers would save for this config, built on the meta device."""
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # save_pretrained omits a tied head
    return state


def meta_source(name: str, config: dict, state: dict[str, torch.Tensor],
                values: dict[str, Lazy] | None = None) -> Source:
    """A Source over data-free tensors: keys and shapes only. Data is never needed for keys and
    shapes: a nonzero stand-in keeps every bias, unless `values` (from a previous conversion,
    whose filled biases are real zeros) says otherwise."""
    family = FAMILIES[config["model_type"]]
    spec = family.read(as_loaded(config, name), name)  # as open_hf reads a config.json
    entries = {k: Entry(Path(name), 0, 0, v.dtype, tuple(v.shape)) for k, v in state.items()}
    tensors = read_canonical(entries, family, spec, name)  # every key placed, none missing
    tensors = {k: (values or {}).get(k, Lazy(v.meta, lambda: torch.ones(1))) for k, v in tensors.items()}
    return Source(Path(name), family, spec, {}, tensors, str)


def convert_meta(source: Source, to: str) -> tuple[dict, dict[str, tuple[int, ...]], dict[str, Lazy]]:
    family = FAMILIES[to]
    prepared = prepare(source, HFTarget(family, 2**40), allow=["sliding_window"])
    planned = plan_target(prepared.tensors, family, prepared.held, None)
    names = [p.name for p in planned]
    assert len(names) == len(set(names)), "a target key was produced twice"
    return family.config(prepared.held, {}), {p.name: p.shape for p in planned}, prepared.tensors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_key_once_both_ways_at_real_size(name: str) -> None:
    config = CONFIGS[name]
    state = meta_state(config)
    llama_config, llama_keys, values = convert_meta(meta_source(name, config, state), "llama")
    want = meta_state(llama_config)
    assert llama_keys == {k: tuple(v.shape) for k, v in want.items()}

    back = meta_source("llama", llama_config, want, values)
    back_config, back_keys, _ = convert_meta(back, config["model_type"])
    assert back_keys == {k: tuple(v.shape) for k, v in meta_state(back_config).items()}
    # The same tensors come back; a folded family stays untied, as the Llama it came from.
    extra = set(back_keys) - set(state)
    assert extra <= {"lm_head.weight"} and set(state) <= set(back_keys)
    assert back_config["vocab_size"] == config["vocab_size"]


def test_gemma_7b_becomes_a_llama_with_tanh_gelu() -> None:
    """Gemma's releases say "gelu" and run the tanh approximation: Llama must be told which."""
    config = CONFIGS["Gemma-7B"]
    llama_config, _, _ = convert_meta(meta_source("Gemma-7B", config, meta_state(config)), "llama")
    assert config["hidden_act"] == "gelu" and llama_config["hidden_act"] == "gelu_pytorch_tanh"


GEMMA2_9B = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
             "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
             "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
             "final_logit_softcapping": 30.0, "tie_word_embeddings": True}


def test_gemma2_9b_every_key_once_into_the_unified_model_and_back() -> None:
    """Gemma2 converts to no HF family; the unified model holds it: its key map, the canonical
    shapes and the unified model built on the meta device agree at real size."""
    from reference.modeling import UnifiedConfig, UnifiedForCausalLM

    state = meta_state(GEMMA2_9B)
    source = meta_source("Gemma-2-9B", GEMMA2_9B, state)  # every key placed, none missing
    spec = source.spec
    assert spec.window_layers == tuple(range(0, 42, 2)) and spec.attention_multiplier is None
    with torch.device("meta"):
        model = UnifiedForCausalLM(UnifiedConfig.from_spec(spec))
    built = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert built == {k: tuple(v.meta.shape) for k, v in source.tensors.items()}
    planned = plan_target(source.tensors, FAMILIES["gemma2"], spec, None)
    assert {p.name: p.shape for p in planned} == {k: tuple(v.shape) for k, v in state.items()}


REAL = {**CONFIGS, "Gemma-2-9B": GEMMA2_9B}


def _norm_eps(module: torch.nn.Module) -> float | None:
    """The epsilon a norm module holds (RMSNorm's variance_epsilon, LayerNorm's eps)."""
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


@pytest.mark.parametrize("name", list(REAL))
def test_the_spec_holds_what_the_transformers_class_computes_at_real_size(name: str) -> None:
    """At real size, on the meta device: the unified model built from our spec has the shape of
    every transformers parameter (through the key map, fused tensors split), and the spec's head
    size, attention scale, window of each layer, norm eps and rope frequencies are what the
    transformers modules hold."""
    from reference.modeling import UnifiedConfig, UnifiedForCausalLM
    from reference.modeling.rope import Rotary

    config = REAL[name]
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        original = AutoModelForCausalLM.from_config(cfg)
    state = original.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    source = meta_source(name, config, state)
    spec = source.spec
    unified_config = UnifiedConfig.from_spec(spec)
    with torch.device("meta"):
        model = UnifiedForCausalLM(unified_config)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()
             if not (spec.tie_word_embeddings and k == "lm_head.weight")}
    assert built == {k: tuple(v.meta.shape) for k, v in source.tensors.items()}

    for i, (theirs, ours) in enumerate(zip(original.model.layers, model.layers, strict=True)):
        attn = theirs.self_attn
        assert (attn.head_dim, attn.scaling) == (spec.head_dim, ours.attn.scale), f"layer {i}"
        # per layer where the class keeps it on the attention (Qwen2, Gemma2), else the model's
        # mask reads the config's, for every layer (Mistral, Phi3)
        window = getattr(attn, "sliding_window", getattr(cfg, "sliding_window", None))
        if window is not None and window >= spec.max_position_embeddings:
            window = None  # no sequence the model takes is longer: no window, as the spec holds it
        assert window == spec.window_of(i), f"layer {i}"
    norms = [m for m in original.modules() if "norm" in type(m).__name__.lower()]
    assert norms and {_norm_eps(m) for m in norms} == {spec.norm_eps}

    # The meta model's rope buffers hold no values: its rotary class computes them on the CPU.
    rotary = type(original.model.rotary_emb)(config=cfg)
    ours = Rotary(unified_config)
    torch.testing.assert_close(ours.inv_freq, rotary.inv_freq, rtol=0, atol=0)
    assert ours.scalings == [rotary.attention_scaling]


# ChatGLM's remote-code configs (no class in transformers): the fields that shape the tensors.
_CHATGLM = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": 4096,
            "num_attention_heads": 32, "multi_query_attention": True, "multi_query_group_num": 2,
            "kv_channels": 128, "ffn_hidden_size": 13696, "layernorm_epsilon": 1e-5, "rmsnorm": True,
            "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
            "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False}
CHATGLM_CONFIGS = {
    "ChatGLM3-6B": {**_CHATGLM, "num_layers": 28, "padded_vocab_size": 65024, "seq_length": 8192,
                    "pad_token_id": 0, "eos_token_id": 2},
    "GLM-4-9B-chat": {**_CHATGLM, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072,
                      "rope_ratio": 500, "layernorm_epsilon": 1.5625e-07, "pad_token_id": 151329,
                      "eos_token_id": [151329, 151336, 151338]},
}
# GLM-4's modeling_chatglm.py multiplies the rope base by rope_ratio (the line that says so).
CHATGLM_CODE = {"modeling_chatglm.py": "        base = base * self.rope_ratio\n"}


def chatglm_state(config: dict) -> dict[str, torch.Tensor]:
    """The tensors the published ChatGLMForConditionalGeneration saves, as data-free stand-ins."""
    h, ff, v = config["hidden_size"], config["ffn_hidden_size"], config["padded_vocab_size"]
    d, heads, groups = config["kv_channels"], config["num_attention_heads"], config["multi_query_group_num"]
    qkv = (heads + 2 * groups) * d
    shapes = {"transformer.embedding.word_embeddings.weight": (v, h),
              "transformer.rotary_pos_emb.inv_freq": (d // 4,),
              "transformer.encoder.final_layernorm.weight": (h,), "transformer.output_layer.weight": (v, h)}
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "self_attention.query_key_value.weight": (qkv, h),
                   p + "self_attention.query_key_value.bias": (qkv,),
                   p + "self_attention.dense.weight": (h, heads * d),
                   p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.dense_h_to_4h.weight": (2 * ff, h), p + "mlp.dense_4h_to_h.weight": (h, ff)}
    return {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(CHATGLM_CONFIGS))
def test_chatglm_every_key_once_both_ways_at_real_size(name: str) -> None:
    """ChatGLM3-6B and GLM-4-9B-chat -> glm -> chatglm: every key once, the shapes of
    transformers' GlmForCausalLM there and of the published layout back (inv_freq made again)."""
    config = CHATGLM_CONFIGS[name]
    state = chatglm_state(config)
    family = FAMILIES["chatglm"]
    spec = family.read(config, name, CHATGLM_CODE)
    entries = {k: Entry(Path(name), 0, 0, t.dtype, tuple(t.shape)) for k, t in state.items()}
    tensors = read_canonical(entries, family, spec, name)  # every key placed, none missing
    source = Source(Path(name), family, spec, {},
                    {k: Lazy(t.meta, lambda: torch.ones(1)) for k, t in tensors.items()}, str)
    glm_config, glm_keys, values = convert_meta(source, "glm")
    glm_config |= passthrough(config)  # the token ids, as a conversion writes them
    want = meta_state(glm_config)
    assert glm_keys == {k: tuple(t.shape) for k, t in want.items()}
    assert glm_config["rope_parameters"]["rope_theta"] == 10000.0 * config.get("rope_ratio", 1)

    back_config, back_keys, _ = convert_meta(meta_source("glm", glm_config, want, values), "chatglm")
    assert back_keys == {k: tuple(t.shape) for k, t in state.items()}
    for field in ("num_layers", "padded_vocab_size", "multi_query_group_num", "kv_channels",
                  "ffn_hidden_size", "rope_ratio"):
        assert back_config[field] == config.get(field, 1)
