"""Tiny random models of every family, with weights that depend only on (seed, name).

The shapes exercise the hard cases: GQA with 3 query heads per KV head (groups neither 1 nor
the head count), head_dim != hidden / heads, 2 layers, a vocabulary that is no multiple of 128.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

SHAPE: dict[str, Any] = {
    "vocab_size": 250,
    "hidden_size": 72,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 16,  # hidden / heads = 12
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

# model_type -> config fields on top of SHAPE. Every registered family needs a row.
TINY: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": False},
    "qwen2": {},
    "qwen3": {"attention_bias": True},
    "mistral": {"sliding_window": None},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gemma": {"hidden_act": "gelu_pytorch_tanh", "pad_token_id": 0},
    "granite": {"embedding_multiplier": 12.0, "attention_multiplier": 0.0078125,
                "residual_multiplier": 0.22, "logits_scaling": 8.0},
    "gemma2": {"pad_token_id": 0, "sliding_window": 4, "query_pre_attn_scalar": 16},
    "gemma3_text": {"pad_token_id": 0, "sliding_window": 4, "query_pre_attn_scalar": 16,
                    "rope_parameters": None},
    "glm": {"pad_token_id": 0, "eos_token_id": 2},
    "glm4": {"pad_token_id": 0, "eos_token_id": 2},
    "olmo2": {"pad_token_id": 0, "eos_token_id": 2},
    "cohere": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "layer_norm_eps": 1e-5},
    # head_dim follows hidden / heads here; rope needs an even rotary width.
    "stablelm": {"layer_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "head_dim": None,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.5}},
    "starcoder2": {"norm_epsilon": 1e-5, "bos_token_id": 1, "eos_token_id": 2},
    # Phi and GPT-NeoX fix head_dim at hidden / heads; GPT-NeoX has no GQA either.
    "phi": {"layer_norm_eps": 1e-5, "head_dim": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "gpt_neox": {"layer_norm_eps": 1e-5, "head_dim": None, "num_key_value_heads": None,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.5}},
    "olmo": {"pad_token_id": 0, "eos_token_id": 2},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 12.0,
                   "attention_multiplier": 0.0078125, "residual_multiplier": 0.22, "logits_scaling": 8.0},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    # OLMoE's q/k norms span hidden_size, so head_dim stays hidden / heads; experts of intermediate_size
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32, "head_dim": None,
              "pad_token_id": 0, "eos_token_id": 2},
    "deepseek_v2": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1,
                    "first_k_dense_replace": 1, "pad_token_id": 0, "head_dim": None,
                    "num_key_value_heads": 6},  # MLA has one KV head per query head
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1,
                    "first_k_dense_replace": 1, "pad_token_id": 0, "head_dim": None,
                    "num_key_value_heads": 6},
}


def tiny_config(model_type: str, *, tie: bool = False, **overrides: Any):
    """A transformers config of the family's tiny shape."""
    from transformers import AutoConfig

    fields = {**SHAPE, **TINY[model_type], "tie_word_embeddings": tie, **overrides}
    # None removes a SHAPE field the family does not take; any other None is the config's value
    # (a None window, q_lora_rank None: one q projection), which dropping would turn into its default.
    fields = {k: v for k, v in fields.items() if v is not None or k not in SHAPE}
    return AutoConfig.for_model(model_type, **fields)


def fill(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a generator seeded by (seed, its name): independent of
    transformers' init order. Norm weights centre on 1, everything else on 0; biases are
    nonzero so that a dropped bias cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            values = torch.randn(p.shape, generator=g, dtype=torch.float32)
            centre = 1.0 if "norm" in name and p.ndim == 1 else 0.0
            scale = 0.5 if p.ndim == 1 or "embed" in name else p.shape[-1] ** -0.5
            p.copy_(centre + scale * values)


def tiny_model(model_type: str, *, tie: bool = False, seed: int = 0, **overrides: Any):
    """A tiny fp32 model of the family, in eval mode, filled by `fill`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, tie=tie, **overrides)
    # eager attention, and transformers' eager experts loop (its default is grouped_mm)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager",
                                             experts_implementation="eager")
    fill(model, seed)
    return model.eval()


def save_tiny(model_type: str, path: Path, *, tie: bool = False, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny model as an HF directory (what `from_pretrained` and converters read)."""
    tiny_model(model_type, tie=tie, seed=seed, **overrides).save_pretrained(path)
    return path


def golden_input() -> torch.Tensor:
    """The fixed token ids every golden and equivalence check runs on: (2, 12)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, SHAPE["vocab_size"], (2, 12), generator=g)


def logits(model: torch.nn.Module, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits of a model on the golden input."""
    ids = golden_input() if input_ids is None else input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


TEXT = (
    "the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat "
    "near the old red barn where farmers store grain and hay for the long cold winter months "
    "children play outside in the bright morning sun and birds sing songs from tall green trees "
    "every river flows down to the sea carrying stones sand and stories from distant mountains "
    "people read books write letters cook dinner walk home and dream about faraway places "
    "engineers measure weights compare logits and trust nothing they have not checked twice"
)


def tiny_tokenizer(vocab_size: int = SHAPE["vocab_size"]) -> Any:
    """A BPE tokenizer of exactly `vocab_size` tokens, trained on TEXT: readable word pieces for
    the tiny models (the probes' tables and plots), unknown characters as <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>")
