"""Weight names as data: HF name templates <-> canonical templates, inverse derived.

A template holds `{}` where the layer number goes. A rule maps one HF template to one
canonical template (a rename), to none (a tensor deliberately dropped, e.g. rotary caches),
to several through `Fused` (one HF tensor holding several canonical ones as row blocks), or
to none through `Computed` (a buffer the family persists but computes from the config alone:
checked and dropped on the way in, made again on the way out), or to one set per expert through
`ExpertStack` (a mixture's experts stacked along dim 0 of one tensor).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reference.errors import InputError
from reference.families.spec import ModelSpec, linear_shapes

if TYPE_CHECKING:  # imported where tensors are cut: `reference families` reads rows only
    import torch

# (part index, rows) blocks, in the order the fused tensor stores them.
Blocks = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Fused:
    """Canonical parts stored as row blocks of one tensor (an HF family's, or Megatron's
    linear_qkv and linear_fc1 on each TP rank). `blocks(spec)` says which part
    each consecutive block of rows belongs to; split and merge are its two directions, pure
    slicing and concatenation, so they are lossless."""

    parts: tuple[str, ...]
    blocks: Callable[[ModelSpec], Blocks]

    def row_blocks(self, fused: torch.Tensor, spec: ModelSpec) -> list[list[torch.Tensor]]:
        """Each part's row blocks of `fused`, as views, in order."""
        pieces: list[list[torch.Tensor]] = [[] for _ in self.parts]
        start = 0
        for part, rows in self.blocks(spec):
            pieces[part].append(fused[start:start + rows])
            start += rows
        if start != fused.shape[0]:
            raise InputError(f"fused tensor of {fused.shape[0]} rows does not fit {self.parts}")
        return pieces

    def split(self, fused: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
        import torch

        return [torch.cat(p) for p in self.row_blocks(fused, spec)]

    def merge(self, parts: Sequence[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
        import torch

        offsets = [0] * len(parts)
        out = []
        for part, rows in self.blocks(spec):
            out.append(parts[part][offsets[part]:offsets[part] + rows])
            offsets[part] += rows
        return torch.cat(out)


@dataclass(frozen=True)
class Stacked:
    """One canonical tensor whose rows the family stores as tensors of their own, numbered in
    the last `{}` of the HF template (StableLM's per-head q/k LayerNorms: `q_layernorm.norms.{h}`
    is row h of the canonical q_norm, (heads, head_dim)). Stacking and indexing are lossless."""

    part: str


@dataclass(frozen=True)
class Computed:
    """A tensor the family stores but computes from the spec alone (ChatGLM's persisted rope
    `inv_freq`). `make(spec, dtype)` is its recipe, in the dtype of the model's embedding: a
    stored one must equal it (then it is dropped: it holds nothing the spec does not), and a
    target of the family gets it made again, so a roundtrip returns it bitwise."""

    make: Callable[[ModelSpec, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class ExpertStack:
    """Each routed expert's tensor stacked along dim 0 of one (GraniteMoE's input_linear,
    (experts, 2 * size, hidden)), as many as the spec has experts. One expert's slice is the
    canonical `inner` (a template whose last `{}` numbers the expert) or, through a `Fused`
    rule, several: its blocks see the spec of one expert, a linear of the experts' width
    (GATE_UP then cuts expert_size rows, not the dense MLP's). Canonical names run expert-major:
    expert 0's parts, then expert 1's. Split and merge are slicing and copying: lossless."""

    inner: str | Fused

    @property
    def parts(self) -> tuple[str, ...]:
        """The canonical templates of one expert's slice."""
        return (self.inner,) if isinstance(self.inner, str) else self.inner.parts

    @staticmethod
    def count(spec: ModelSpec) -> int:
        """How many experts the tensor stacks."""
        return spec.num_experts

    @staticmethod
    def expert(spec: ModelSpec) -> ModelSpec:
        """The spec one expert's slice is cut by: its linears are expert_size wide."""
        assert spec.moe is not None, "an expert stack needs a mixture of experts"
        return spec.replace(intermediate_size=spec.moe.expert_size)

    def names(self, templates: Sequence[str], spec: ModelSpec) -> list[str]:
        """The canonical names of the whole stack, from its parts' templates (as `KeyMap.canonical`
        gives them, the expert's `{}` still open), expert-major."""
        return [t.format(e) for e in range(self.count(spec)) for t in templates]

    def cut(self, one: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
        """One expert's slice as its canonical tensors."""
        return [one] if isinstance(self.inner, str) else self.inner.split(one, self.expert(spec))

    def split(self, stacked: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
        """Every expert's canonical tensors, expert-major."""
        if stacked.shape[0] != self.count(spec):
            raise InputError(f"a stack of {stacked.shape[0]} experts where the spec has {self.count(spec)}")
        return [t for one in stacked for t in self.cut(one, spec)]

    def merge(self, experts: Iterable[Sequence[torch.Tensor]], spec: ModelSpec) -> torch.Tensor:
        """The stacked tensor from each expert's parts, pulled one expert at a time and copied
        into place: memory is the stack and one expert, never a list of every expert beside it."""
        import torch

        out: torch.Tensor | None = None
        for e, parts in enumerate(experts):
            one = parts[0] if isinstance(self.inner, str) else self.inner.merge(parts, self.expert(spec))
            if out is None:
                out = torch.empty((self.count(spec), *one.shape), dtype=one.dtype, device=one.device)
            out[e] = one
        assert out is not None and e + 1 == self.count(spec), "one part list per expert"
        return out


def concat(*linears: str) -> Callable[[ModelSpec], Blocks]:
    """Blocks of a plain concatenation of linears' rows, named as in `linear_shapes`
    (Phi3's qkv_proj: q, k, v; gate_up_proj: gate, up)."""
    return lambda spec: [(i, linear_shapes(spec)[p][0]) for i, p in enumerate(linears)]


QKV = concat("q", "k", "v")
GATE_UP = concat("gate", "up")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


Rule = str | Fused | Stacked | Computed | ExpertStack | None


class KeyMap:
    """Rules from HF templates to canonical ones; every canonical template has one home."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        self.rules = dict(rules)
        self._hf = [(_pattern(h), rule) for h, rule in self.rules.items()]
        homes: dict[str, tuple[str, int, Rule]] = {}
        for hf, rule in self.rules.items():
            parts = ((rule,) if isinstance(rule, str) else (rule.part,) if isinstance(rule, Stacked)
                     else rule.parts if isinstance(rule, (Fused, ExpertStack)) else ())
            for i, c in enumerate(parts):
                if c in homes:
                    raise ValueError(f"canonical '{c}' has two HF homes")
                homes[c] = (hf, i, rule)
        self._canonical = [(_pattern(c), home) for c, home in homes.items()]

    def canonical(self, hf_key: str,
                  where: str) -> tuple[list[str], Fused | Stacked | Computed | ExpertStack | None]:
        """Canonical names an HF tensor holds ([] if dropped or computed), and how they are
        fused or stacked (`row` says which row of a Stacked one it is; an ExpertStack's are
        one expert's templates, its number still `{}`: `ExpertStack.names` fills them)."""
        for pattern, rule in self._hf:
            match = pattern.match(hf_key)
            if match:
                if rule is None or isinstance(rule, Computed):
                    return [], rule
                if isinstance(rule, str):
                    return [rule.format(*match.groups())], None
                if isinstance(rule, Stacked):
                    return [rule.part.format(*match.groups()[:-1])], rule
                if isinstance(rule, ExpertStack):
                    return [p.format(*match.groups(), "{}") for p in rule.parts], rule
                return [p.format(*match.groups()) for p in rule.parts], rule
        raise InputError(f"{where}: unknown tensor '{hf_key}' for this family")

    def row(self, hf_key: str) -> int:
        """The row of a Stacked canonical tensor an HF tensor holds: its last number."""
        for pattern, _ in self._hf:
            match = pattern.match(hf_key)
            if match:
                return int(match.groups()[-1])
        raise KeyError(hf_key)

    def hf(self, canonical_key: str, family: str) -> tuple[str, int]:
        """The HF name that holds a canonical tensor, and its part index there (in an
        ExpertStack, counted expert-major over the whole stack). A Stacked home keeps `{}`
        where the row number goes."""
        for pattern, (hf, part, rule) in self._canonical:
            match = pattern.match(canonical_key)
            if match:
                if isinstance(rule, ExpertStack):  # the expert is the canonical name's last number
                    part += int(match.groups()[-1]) * len(rule.parts)
                return hf.format(*match.groups(), "{}"), part
        raise InputError(f"{family} has no tensor for canonical '{canonical_key}'")

    def computed(self, num_layers: int) -> list[tuple[str, Computed]]:
        """Every HF tensor a target of the family makes from the spec, by name."""
        return [(hf.format(i), rule) for hf, rule in self.rules.items() if isinstance(rule, Computed)
                for i in (range(num_layers) if "{}" in hf else [0])]

    def rule(self, hf_key: str) -> Rule:
        """The rule of an HF name this map produced."""
        for pattern, rule in self._hf:
            if pattern.match(hf_key):
                return rule
        raise KeyError(hf_key)


def _llama_rules(attn: Mapping[str, Rule], mlp: Mapping[str, Rule]) -> dict[str, Rule]:
    return {
        "model.embed_tokens.weight": "embed.weight",
        "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
        **{f"model.layers.{{}}.self_attn.{k}": v for k, v in attn.items()},
        "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
        "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
        "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
        **{f"model.layers.{{}}.mlp.{k}": v for k, v in mlp.items()},
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
        # Older checkpoints saved rotary caches as buffers; they are recomputed from the config.
        "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    }


_BOTH = ("weight", "bias")
_LLAMA_ATTN = {f"{p}_proj.{w}": f"layers.{{}}.attn.{p}.{w}" for p in "qkvo" for w in _BOTH}
_LLAMA_MLP = {f"{p}_proj.{w}": f"layers.{{}}.mlp.{p}.{w}" for p in ("gate", "up", "down") for w in _BOTH}
LLAMA_KEYS = KeyMap(_llama_rules(_LLAMA_ATTN, _LLAMA_MLP))

# Gemma2's four norms per layer (OLMo2 has the two post norms only, and q_norm / k_norm over
# all heads: the same names with other shapes). Here post_attention_layernorm is the norm on
# attention's output, not Llama's norm before the MLP.
POST_NORM_KEYS = KeyMap({
    **_llama_rules(_LLAMA_ATTN, _LLAMA_MLP),
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.attn_post_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_post_norm.weight",
})

PHI3_KEYS = KeyMap(_llama_rules(
    {"qkv_proj.weight": Fused(tuple(f"layers.{{}}.attn.{p}.weight" for p in "qkv"), QKV),
     "o_proj.weight": "layers.{}.attn.o.weight"},
    {"gate_up_proj.weight": Fused(("layers.{}.mlp.gate.weight", "layers.{}.mlp.up.weight"), GATE_UP),
     "down_proj.weight": "layers.{}.mlp.down.weight"},
))

# GLM: Llama's attention (q, k, v with bias) and Phi3's fused gate_up_proj. GLM4 adds a norm on
# the output of attention and of the MLP; its post_attention_layernorm stays the norm before
# the MLP, as in Llama (Gemma2 uses that name for the norm on attention's output).
_GLM_RULES = _llama_rules(_LLAMA_ATTN, {
    "gate_up_proj.weight": Fused(("layers.{}.mlp.gate.weight", "layers.{}.mlp.up.weight"), GATE_UP),
    "down_proj.weight": "layers.{}.mlp.down.weight",
})
GLM_KEYS = KeyMap(_GLM_RULES)
GLM4_KEYS = KeyMap({
    **_GLM_RULES,
    "model.layers.{}.post_self_attn_layernorm.weight": "layers.{}.attn_post_norm.weight",
    "model.layers.{}.post_mlp_layernorm.weight": "layers.{}.mlp_post_norm.weight",
})

BAICHUAN_KEYS = KeyMap(_llama_rules(
    {"W_pack.weight": Fused(tuple(f"layers.{{}}.attn.{p}.weight" for p in "qkv"), QKV),
     "o_proj.weight": "layers.{}.attn.o.weight"},
    {f"{p}_proj.weight": f"layers.{{}}.mlp.{p}.weight" for p in ("gate", "up", "down")},
))


# Mixtures of experts: a second `{}` numbers the expert, within the layer's.
_EXPERT = {"gate": "layers.{}.mlp.experts.{}.gate.weight", "up": "layers.{}.mlp.experts.{}.up.weight",
           "down": "layers.{}.mlp.experts.{}.down.weight"}
_LLAMA_RULES = _llama_rules(_LLAMA_ATTN, _LLAMA_MLP)
MIXTRAL_KEYS = KeyMap({
    **{h: c for h, c in _LLAMA_RULES.items() if ".mlp." not in h},
    "model.layers.{}.block_sparse_moe.gate.weight": "layers.{}.mlp.router.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight": _EXPERT["gate"],
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight": _EXPERT["up"],
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight": _EXPERT["down"],
})
# GraniteMoE: Mixtral's block under other names, each layer's experts stacked in two tensors:
# input_linear (experts, 2 * size, hidden) holds each expert's gate rows then its up rows,
# output_linear (experts, hidden, size) each expert's down projection.
GRANITEMOE_KEYS = KeyMap({
    **{h: c for h, c in _LLAMA_RULES.items() if ".mlp." not in h},
    "model.layers.{}.block_sparse_moe.router.layer.weight": "layers.{}.mlp.router.weight",
    "model.layers.{}.block_sparse_moe.input_linear.weight":
        ExpertStack(Fused((_EXPERT["gate"], _EXPERT["up"]), GATE_UP)),
    "model.layers.{}.block_sparse_moe.output_linear.weight": ExpertStack(_EXPERT["down"]),
})
# Qwen2-MoE, Qwen3-MoE, OLMoE: the router is mlp.gate, beside the dense MLP's mlp.gate_proj of
# the layers without experts; Qwen2-MoE adds a shared expert and its gate.
MOE_KEYS = KeyMap({
    **_LLAMA_RULES,
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.router.weight",
    **{f"model.layers.{{}}.mlp.experts.{{}}.{p}_proj.weight": c for p, c in _EXPERT.items()},
    **{f"model.layers.{{}}.mlp.shared_expert.{p}_proj.weight": f"layers.{{}}.mlp.shared.{p}.weight"
       for p in ("gate", "up", "down")},
    "model.layers.{}.mlp.shared_expert_gate.weight": "layers.{}.mlp.shared_gate.weight",
})

# DeepSeek-V2/3: latent attention's projections and norms; the mixture's router (V3: with its
# e_score_correction_bias) and its shared experts, fused into one MLP.
_MLA = {"q_proj": "q", "q_a_proj": "q_a", "q_a_layernorm": "q_a_norm", "q_b_proj": "q_b",
        "kv_a_proj_with_mqa": "kv_a", "kv_a_layernorm": "kv_a_norm", "kv_b_proj": "kv_b", "o_proj": "o"}
DEEPSEEK_KEYS = KeyMap({
    **{h: c for h, c in _LLAMA_RULES.items() if ".self_attn." not in h or "rotary_emb" in h},
    **{f"model.layers.{{}}.self_attn.{h}.weight": f"layers.{{}}.attn.{c}.weight" for h, c in _MLA.items()},
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.router.weight",
    "model.layers.{}.mlp.gate.e_score_correction_bias": "layers.{}.mlp.choice_bias",
    **{f"model.layers.{{}}.mlp.experts.{{}}.{p}_proj.weight": c for p, c in _EXPERT.items()},
    **{f"model.layers.{{}}.mlp.shared_experts.{p}_proj.weight": f"layers.{{}}.mlp.shared.{p}.weight"
       for p in ("gate", "up", "down")},
})


def grouped_qkv(spec: ModelSpec) -> Blocks:
    """InternLM2's wqkv: per KV head, its group's query heads, then its key, then its value."""
    group = spec.num_heads // spec.num_kv_heads
    return [blk for _ in range(spec.num_kv_heads)
            for blk in ((0, group * spec.head_dim), (1, spec.head_dim), (2, spec.head_dim))]


def _parts(kind: str) -> tuple[str, ...]:
    return tuple(f"layers.{{}}.attn.{p}.{kind}" for p in "qkv")


INTERNLM2_KEYS = KeyMap({
    "model.tok_embeddings.weight": "embed.weight",
    "model.layers.{}.attention_norm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.attention.wqkv.weight": Fused(_parts("weight"), grouped_qkv),
    "model.layers.{}.attention.wqkv.bias": Fused(_parts("bias"), grouped_qkv),
    "model.layers.{}.attention.wo.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.attention.wo.bias": "layers.{}.attn.o.bias",
    "model.layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.feed_forward.w1.weight": "layers.{}.mlp.gate.weight",
    "model.layers.{}.feed_forward.w3.weight": "layers.{}.mlp.up.weight",
    "model.layers.{}.feed_forward.w2.weight": "layers.{}.mlp.down.weight",
    "model.norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
})

QWEN_KEYS = KeyMap({
    "transformer.wte.weight": "embed.weight",
    "transformer.h.{}.ln_1.weight": "layers.{}.attn_norm.weight",
    "transformer.h.{}.attn.c_attn.weight": Fused(_parts("weight"), QKV),
    "transformer.h.{}.attn.c_attn.bias": Fused(_parts("bias"), QKV),
    "transformer.h.{}.attn.c_proj.weight": "layers.{}.attn.o.weight",
    "transformer.h.{}.ln_2.weight": "layers.{}.mlp_norm.weight",
    # Qwen's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
    "transformer.h.{}.mlp.w2.weight": "layers.{}.mlp.gate.weight",
    "transformer.h.{}.mlp.w1.weight": "layers.{}.mlp.up.weight",
    "transformer.h.{}.mlp.c_proj.weight": "layers.{}.mlp.down.weight",
    "transformer.ln_f.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
})


def _with_bias(rules: Mapping[str, Rule]) -> dict[str, Rule]:
    """Each `.weight` rule and its `.bias` twin (families whose norms or linears have biases)."""
    out: dict[str, Rule] = {}
    for hf, rule in rules.items():
        out[hf] = rule
        if isinstance(rule, str) and hf.endswith(".weight"):
            out[hf.removesuffix("weight") + "bias"] = rule.removesuffix("weight") + "bias"
    return out


_NORMS = {"model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
          "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
          "model.norm.weight": "norm.weight"}
# StableLM: LayerNorm with a bias, Llama's names otherwise, and a LayerNorm of its own per head
# for q and k.
STABLELM_KEYS = KeyMap({
    **{h: c for h, c in _llama_rules(_LLAMA_ATTN, _LLAMA_MLP).items() if "_norm." not in h},
    **_with_bias(_NORMS),
    "model.layers.{}.self_attn.q_layernorm.norms.{}.weight": Stacked("layers.{}.attn.q_norm.weight"),
    "model.layers.{}.self_attn.k_layernorm.norms.{}.weight": Stacked("layers.{}.attn.k_norm.weight"),
})

STARCODER2_KEYS = KeyMap({
    **_llama_rules(_LLAMA_ATTN, _with_bias({"c_fc.weight": "layers.{}.mlp.up.weight",
                                             "c_proj.weight": "layers.{}.mlp.down.weight"})),
    **_with_bias(_NORMS),
})

PHI_KEYS = KeyMap(_with_bias({
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    **{f"model.layers.{{}}.self_attn.{p}_proj.weight": f"layers.{{}}.attn.{p}.weight" for p in "qkv"},
    "model.layers.{}.self_attn.dense.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.self_attn.q_layernorm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_layernorm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.mlp.fc1.weight": "layers.{}.mlp.up.weight",
    "model.layers.{}.mlp.fc2.weight": "layers.{}.mlp.down.weight",
    "model.final_layernorm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}))

# GPT-NeoX's query_key_value holds, for each head, its q, k and v rows: InternLM2's grouping
# with one query head per group (GPT-NeoX has no GQA).
GPT_NEOX_KEYS = KeyMap({
    **_with_bias({
        "gpt_neox.embed_in.weight": "embed.weight",
        "gpt_neox.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
        "gpt_neox.layers.{}.attention.dense.weight": "layers.{}.attn.o.weight",
        "gpt_neox.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": "layers.{}.mlp.up.weight",
        "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": "layers.{}.mlp.down.weight",
        "gpt_neox.final_layer_norm.weight": "norm.weight",
    }),
    "gpt_neox.layers.{}.attention.query_key_value.weight": Fused(_parts("weight"), grouped_qkv),
    "gpt_neox.layers.{}.attention.query_key_value.bias": Fused(_parts("bias"), grouped_qkv),
    "embed_out.weight": "lm_head.weight",
    # Older checkpoints saved the causal mask and rotary caches as buffers; they are recomputed.
    "gpt_neox.layers.{}.attention.bias": None,
    "gpt_neox.layers.{}.attention.masked_bias": None,
    "gpt_neox.layers.{}.attention.rotary_emb.inv_freq": None,
})


def chatglm_inv_freq(spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """ChatGLM's `rotary_pos_emb.inv_freq` buffer as its RotaryEmbedding(kv_channels // 2)
    makes it: always base 10000, computed in the model's dtype (its forward never reads the
    values, only their dtype, and recomputes the frequencies from the base times rope_ratio)."""
    import torch

    dim = spec.head_dim // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype) / dim))


def chatglm_qkv(spec: ModelSpec) -> Blocks:
    """ChatGLM's query_key_value: every query head, then the key groups, then the value groups."""
    return [(0, spec.num_heads * spec.head_dim), (1, spec.num_kv_heads * spec.head_dim),
            (2, spec.num_kv_heads * spec.head_dim)]


def _mlp_parts(kind: str) -> tuple[str, ...]:
    return tuple(f"layers.{{}}.mlp.{p}.{kind}" for p in ("gate", "up"))


# ChatGLM2 / ChatGLM3 / GLM-4 remote code (model_type "chatglm"): GLM's computation under
# Megatron-style names; mlp.dense_h_to_4h holds the gate rows, then the up rows.
_CHATGLM_LAYER = "transformer.encoder.layers.{}."
CHATGLM_KEYS = KeyMap({
    "transformer.embedding.word_embeddings.weight": "embed.weight",
    _CHATGLM_LAYER + "input_layernorm.weight": "layers.{}.attn_norm.weight",
    _CHATGLM_LAYER + "self_attention.query_key_value.weight": Fused(_parts("weight"), chatglm_qkv),
    _CHATGLM_LAYER + "self_attention.query_key_value.bias": Fused(_parts("bias"), chatglm_qkv),
    _CHATGLM_LAYER + "self_attention.dense.weight": "layers.{}.attn.o.weight",
    _CHATGLM_LAYER + "self_attention.dense.bias": "layers.{}.attn.o.bias",
    _CHATGLM_LAYER + "post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    _CHATGLM_LAYER + "mlp.dense_h_to_4h.weight": Fused(_mlp_parts("weight"), GATE_UP),
    _CHATGLM_LAYER + "mlp.dense_h_to_4h.bias": Fused(_mlp_parts("bias"), GATE_UP),
    _CHATGLM_LAYER + "mlp.dense_4h_to_h.weight": "layers.{}.mlp.down.weight",
    _CHATGLM_LAYER + "mlp.dense_4h_to_h.bias": "layers.{}.mlp.down.bias",
    "transformer.encoder.final_layernorm.weight": "norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
    "transformer.rotary_pos_emb.inv_freq": Computed(chatglm_inv_freq),
})
