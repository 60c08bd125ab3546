"""Megatron-Core state-dict keys as data: one rule per tensor, for the local layer spec and
the TransformerEngine one; the TE rules and the inverse map are derived, never written twice.

A template holds `{}` where the layer number goes. In a Megatron stage file the number is the
layer's index within that (virtual) stage; in a canonical name it is the global layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from reference.families.keymap import GATE_UP, Fused, grouped_qkv
from reference.families.spec import MLA


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor: its key template, the canonical tensors it holds, and how tensor
    parallelism cuts it (reference/converters/megatron/stage.py `shard`): "replicated" on every
    rank, "vocab" rows padded then split, "cols" (a row-parallel linear's input columns), "rows"
    (a column-parallel linear's output rows, in one piece: MLA's projections), or a
    `Fused` block layout whose parts are column-parallel (each rank holds the layout of a model
    1/tp as wide: linear_qkv grouped per query group, linear_fc1 as [gate_r; up_r])."""

    key: str
    canonical: tuple[str, ...]
    split: str | Fused
    # Which MLP width a split sees: "dense" (intermediate_size), "experts" (each routed
    # expert's; split over expert TP, and a second `{}` numbers the expert: local to its EP rank
    # in the key, global in the canonical name) or "shared" (the shared expert's, over TP).
    width: str = "dense"
    fp32: bool = False  # kept in float32 whatever the checkpoint's dtype (the router's expert_bias)
    latent: bool | None = None  # only with latent attention (True), only without (False), or either


_L = "decoder.layers.{}."
_ATTN = "layers.{}.attn."
_MLP = "layers.{}.mlp."
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


def _qkv(kind: str) -> Fused:
    return Fused(tuple(_ATTN + f"{p}.{kind}" for p in "qkv"), grouped_qkv)


def _fc1(kind: str) -> Fused:
    return Fused((_MLP + f"gate.{kind}", _MLP + f"up.{kind}"), GATE_UP)


def _fused(key: str, fused: Fused, width: str = "dense") -> Rule:
    return Rule(key, fused.parts, fused, width)


_EXPERT = _MLP + "experts.{}."
_SHARED = _MLP + "shared."
# megatron-core's local MoE spec with moe_grouped_gemm=False: a SequentialMLP of local experts.
MOE_RULES: tuple[Rule, ...] = (
    Rule(_L + "mlp.router.weight", (_MLP + "router.weight",), "replicated"),
    _fused(_L + "mlp.experts.local_experts.{}.linear_fc1.weight",
           Fused((_EXPERT + "gate.weight", _EXPERT + "up.weight"), GATE_UP), "experts"),
    Rule(_L + "mlp.experts.local_experts.{}.linear_fc2.weight", (_EXPERT + "down.weight",), "cols",
         "experts"),
    _fused(_L + "mlp.shared_experts.linear_fc1.weight",
           Fused((_SHARED + "gate.weight", _SHARED + "up.weight"), GATE_UP), "shared"),
    Rule(_L + "mlp.shared_experts.linear_fc2.weight", (_SHARED + "down.weight",), "cols", "shared"),
    Rule(_L + "mlp.shared_experts.gate_weight", (_MLP + "shared_gate.weight",), "replicated"),
)


_SA = _L + "self_attention."
# DeepSeek's routing: V3's e_score_correction_bias is the router's expert_bias buffer, which
# megatron-core keeps in float32 (TopKRouter._maintain_float32_expert_bias).
ROUTER_BIAS = Rule(_L + "mlp.router.expert_bias", (_MLP + "choice_bias",), "replicated", fp32=True)

# megatron-core's local MLA spec (get_gpt_layer_local_spec(multi_latent_attention=True)): every
# projection is a ColumnParallelLinear, the down projections too (their outputs are gathered
# over TP before the norms), so each is cut by rows; q_b and kv_b rows are whole heads in HF's
# order (per head nope then rope, and nope then v), which a row chunk keeps. The latent norms
# are the q/k norms of --qk-layernorm; o is linear_proj, as in LOCAL_RULES.
MLA_RULES: tuple[Rule, ...] = (
    Rule(_SA + "linear_q_proj.weight", (_ATTN + "q.weight",), "rows", latent=True),  # q is linear_qkv's too
    Rule(_SA + "linear_q_down_proj.weight", (_ATTN + "q_a.weight",), "rows"),
    Rule(_SA + "q_layernorm.weight", (_ATTN + "q_a_norm.weight",), "replicated"),
    Rule(_SA + "linear_q_up_proj.weight", (_ATTN + "q_b.weight",), "rows"),
    Rule(_SA + "linear_kv_down_proj.weight", (_ATTN + "kv_a.weight",), "rows"),
    Rule(_SA + "kv_layernorm.weight", (_ATTN + "kv_a_norm.weight",), "replicated"),
    Rule(_SA + "linear_kv_up_proj.weight", (_ATTN + "kv_b.weight",), "rows"),
)


LOCAL_RULES: tuple[Rule, ...] = (
    Rule(EMBEDDING, ("embed.weight",), "vocab"),
    Rule(_L + "input_layernorm.weight", ("layers.{}.attn_norm.weight",), "replicated"),
    _fused(_L + "self_attention.linear_qkv.weight", _qkv("weight")),
    _fused(_L + "self_attention.linear_qkv.bias", _qkv("bias")),
    Rule(_L + "self_attention.q_layernorm.weight", (_ATTN + "q_norm.weight",), "replicated"),
    Rule(_L + "self_attention.k_layernorm.weight", (_ATTN + "k_norm.weight",), "replicated"),
    Rule(_L + "self_attention.linear_proj.weight", (_ATTN + "o.weight",), "cols"),
    Rule(_L + "self_attention.linear_proj.bias", (_ATTN + "o.bias",), "replicated"),
    *MLA_RULES,
    Rule(_L + "pre_mlp_layernorm.weight", ("layers.{}.mlp_norm.weight",), "replicated"),
    _fused(_L + "mlp.linear_fc1.weight", _fc1("weight")),
    _fused(_L + "mlp.linear_fc1.bias", _fc1("bias")),
    Rule(_L + "mlp.linear_fc2.weight", (_MLP + "down.weight",), "cols"),
    Rule(_L + "mlp.linear_fc2.bias", (_MLP + "down.bias",), "replicated"),
    *MOE_RULES,
    ROUTER_BIAS,
    Rule("decoder.final_layernorm.weight", ("norm.weight",), "replicated"),
    Rule(OUTPUT, ("lm_head.weight",), "vocab"),
)

# TransformerEngine fuses each pre-norm into the linear after it.
TE_RENAMES = {
    _L + "input_layernorm.weight": _L + "self_attention.linear_qkv.layer_norm_weight",
    _L + "pre_mlp_layernorm.weight": _L + "mlp.linear_fc1.layer_norm_weight",
}
TE_RULES = tuple(replace(r, key=TE_RENAMES.get(r.key, r.key)) for r in LOCAL_RULES)
RULES = {"local": LOCAL_RULES, "te": TE_RULES}

# Modules whose state dict carries `_extra_state`, which a strict load requires. Megatron's own
# parallel linears save None; TransformerEngine modules save their FP8 metadata, which without
# FP8 is an empty uint8 tensor (TE 2.x). `output_layer` is Megatron's linear in both specs.
_LINEARS = (_L + "self_attention.linear_qkv", _L + "self_attention.linear_proj",
            _L + "mlp.linear_fc1", _L + "mlp.linear_fc2")
# MLA's linears in place of linear_qkv (q: one projection without q_lora_rank, else two).
_MLA_LINEARS = tuple(_SA + f"linear_{p}" for p in ("kv_down_proj", "kv_up_proj", "proj"))
_MLA_Q = {False: (_SA + "linear_q_proj",), True: (_SA + "linear_q_down_proj", _SA + "linear_q_up_proj")}
_TE_ONLY = (_L + "self_attention.core_attention", "decoder.final_layernorm")
_TE_QK = (_L + "self_attention.q_layernorm", _L + "self_attention.k_layernorm")
EXTRA_SUFFIX = "._extra_state"


def extra_states(layer_spec: str, qk_norm: bool, mla: MLA | None = None) -> dict[str, str]:
    """Module template -> "none" or "te" (what its `_extra_state` holds); `mla`: latent attention's
    linears in place of linear_qkv (local spec only)."""
    linears = _LINEARS if mla is None else (*_MLA_Q[mla.q_rank is not None], *_MLA_LINEARS, *_LINEARS[2:])
    out = dict.fromkeys(linears, "none" if layer_spec == "local" else "te")
    if layer_spec == "te":
        out.update(dict.fromkeys(_TE_ONLY + (_TE_QK if qk_norm else ()), "te"))
    out["output_layer"] = "none"
    return out


# megatron-core 0.16.1's TransformerBlock, given one layer's spec rather than a block's (what
# Megatron-LM's gpt_builders passes for a dense model, --transformer-impl local included), builds
# its final norm from transformer_block.LayerNormImpl: TENorm whenever TransformerEngine imports,
# a TE RMSNorm/LayerNorm op whose get_extra_state gives an empty uint8 tensor without FP8 (TE 2.9+;
# a pickled empty dict before). A mixture's block spec names its norm itself (get_gpt_decoder_block_spec:
# TE's only in the TE spec). Megatron-LM's default torch_dist load (assume_ok_unexpected) fails on
# an object the model asks for and the checkpoint lacks, and ignores one it does not ask for: so a
# torch_dist checkpoint carries this object, which loads cleanly with and without TE. Rank files
# cannot please both (torch's strict load refuses a missing and an unexpected key alike; Megatron-LM
# then retries non-strictly and prints the keys): they keep what megatron-core without TE asks for.
FINAL_NORM = "decoder.final_layernorm"


def dist_extra_states(layer_spec: str, dense: bool) -> dict[str, str]:
    """Module -> kind of the extra states a `torch_dist` checkpoint holds beyond its rank files'
    (`extra_states`): the local spec's final norm, when TE would make it (see FINAL_NORM)."""
    return {FINAL_NORM: "te"} if layer_spec == "local" and dense else {}


def extra_state_value(kind: str) -> torch.Tensor | None:
    """A fresh `_extra_state` value: TE's "no FP8" marker, or None for Megatron's linears."""
    return torch.empty(0, dtype=torch.uint8) if kind == "te" else None


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


class KeyTable:
    """The rules of one layer spec, searchable by Megatron key."""

    def __init__(self, layer_spec: str) -> None:
        self.layer_spec = layer_spec
        self.rules = RULES[layer_spec]
        self._patterns = [_pattern(r.key) for r in self.rules]

    def knows(self, key: str) -> bool:
        """Whether some rule of this layer spec names the Megatron key."""
        return any(pattern.match(key) for pattern in self._patterns)
