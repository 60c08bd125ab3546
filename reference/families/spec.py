"""The hub: what a decoder computes (ModelSpec) and the canonical parameter names.

Every family reads its HF config into a ModelSpec and writes one back; every converter goes
family -> canonical -> family. The canonical names are the unified model's state_dict names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class MoE:
    """A mixture of experts in place of the MLP (ModelSpec.num_experts of them): softmax over
    a router's logits, the top_k experts of each token, their outputs summed by those weights."""

    top_k: int
    expert_size: int  # each expert's intermediate size (Mixtral: intermediate_size)
    norm_topk_prob: bool = False  # the top_k weights renormalised to sum to 1 (Mixtral always)
    fp32_weights: bool = False  # the routing weights stay fp32 (Mixtral); False: cast to the model
    # dtype before they scale the experts' outputs (Qwen-MoE, OLMoE): the same in fp32, not in bf16
    shared_size: int = 0  # a shared expert every token goes through, gated by sigmoid(shared_gate(x))
    # (Qwen2-MoE); 0: none
    sparse_step: int = 1  # layer i is a mixture when (i + 1) % sparse_step == 0 (decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()  # layers with the dense MLP whatever the step (mlp_only_layers;
    # DeepSeek's first_k_dense_replace: the first k)
    # DeepSeek's routing. Scores are softmax(logits), or sigmoid(logits) (V3); the experts are
    # chosen by the scores plus `choice_bias` (V3's e_score_correction_bias, a tensor, for the
    # choice only), within the `top_groups` best of `groups` equal groups of experts when
    # groups > 1, a group scored by its best expert ("max", V2) or its best two summed ("top2",
    # V3); the weights are the chosen experts' scores (renormalised if norm_topk_prob), times `scale`.
    scoring: str = "softmax"
    groups: int = 1
    top_groups: int = 1
    group_score: str = "max"
    choice_bias: bool = False
    scale: float = 1.0  # routed_scaling_factor
    fp32_router: bool = False  # the router's logits from fp32 input and weight (DeepSeek), not the
    # model dtype's (Mixtral, Qwen-MoE): the same in fp32, not in bf16
    gated_shared: bool = True  # the shared expert gated by sigmoid(shared_gate(x)) (Qwen2-MoE);
    # False: added as it is (DeepSeek's shared experts, n_shared_experts of them fused into one)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # a JSON list compares unequal
        if self.scoring not in ("softmax", "sigmoid") or self.group_score not in ("max", "top2"):
            raise ValueError(f"MoE scoring must be 'softmax' or 'sigmoid' and group_score 'max' or 'top2', "
                             f"not {self.scoring!r} / {self.group_score!r}")
        if not self.shared_size:  # no shared expert: nothing to gate
            object.__setattr__(self, "gated_shared", True)

    def on(self, layer: int) -> bool:
        """Whether a layer's MLP is the mixture (else the dense MLP of intermediate_size)."""
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0

    def spelled(self, num_layers: int) -> MoE:
        """The same layers, in the one spelling every reader gives them (`layer_spelling`)."""
        step, dense = layer_spelling([self.on(i) for i in range(num_layers)])
        return dataclasses.replace(self, sparse_step=step, dense_layers=dense)


def layer_spelling(mixture: Sequence[bool]) -> tuple[int, tuple[int, ...]]:
    """(sparse_step, dense_layers) of a layer pattern, one spelling of many: the largest step
    every mixture layer keeps, the other layers it would make mixtures listed dense. DeepSeek's
    first k dense layers of 2 ([dense, mixture]) and Qwen-MoE's decoder_sparse_step 2 are one
    pattern; spelled one way, specs that compute the same compare equal."""
    step = math.gcd(*(i + 1 for i, on in enumerate(mixture) if on)) or 1
    return step, tuple(i for i, on in enumerate(mixture) if not on and (i + 1) % step == 0)


@dataclass(frozen=True, kw_only=True)
class MLA:
    """Multi-head latent attention (DeepSeek-V2/3). Each head's query is `nope_dim` dims without
    rope then ModelSpec.head_dim with it; q is one projection (q_rank None, V2-Lite) or a
    low-rank one through a norm (q_a -> q_a_norm -> q_b). K and V come from a latent of
    kv_rank dims (kv_a -> kv_a_norm -> kv_b: per head nope_dim of key, v_dim of value); kv_a
    also yields one rope key of head_dim dims that every head shares."""

    q_rank: int | None
    kv_rank: int
    nope_dim: int  # qk_nope_head_dim
    v_dim: int  # v_head_dim
    norm_eps: float = 1e-6  # the latent norms' (transformers builds them with its default, not rms_norm_eps)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Dimensions plus named features; a feature at its default is one Llama also has."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    rope_parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )
    tie_word_embeddings: bool = False
    # Features. Biases are "zero when absent": a zero bias and no bias compute the same.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # a norm (the model's kind) on q and on k, before rope (Qwen3, OLMo2)
    qk_norm_scope: str = "head"  # "head": over head_dim, one weight shared by the heads (Qwen3,
    # Phi); "each_head": over head_dim, each head its own weight (Cohere, StableLM); "all": over
    # all heads of q (and of k) at once, before splitting into heads (OLMo2)
    qk_norm_bias: bool = False  # the q/k norms add a bias (Phi's q/k LayerNorm)
    rotary_fraction: float = 1.0  # rope on the first fraction of each head only (GLM, StableLM)
    # Scalars some families apply and Llama does not; each can be folded into weights.
    norm_offset: bool = False  # norms compute x * (1 + w) in fp32 (Gemma)
    embedding_multiplier: float = 1.0  # embeddings times this, rounded to the model dtype
    attention_multiplier: float | None = None  # q.k scale; None is Llama's 1 / sqrt(head_dim)
    residual_multiplier: float = 1.0  # each block's output times this before the residual add
    logits_divisor: float = 1.0  # logits / this (Granite's logits_scaling)
    # Architecture no Llama weight can express: only the unified model holds these.
    latent_attention: bool = False  # MLA: low-rank latent KV with decoupled rope (DeepSeek-V2/3);
    # head_dim is then the rope part of each head (as transformers' config sets it)
    mla: MLA | None = None  # its dimensions, with latent_attention
    pre_norms: bool = True  # a norm on the input of attention and of the MLP (all but OLMo2)
    post_norms: bool = False  # a norm on the output of attention and of the MLP, before the
    # residual add (Gemma2: both placements; OLMo2: post only)
    attn_softcap: float | None = None  # tanh soft-capping of attention logits (Gemma2)
    final_softcap: float | None = None  # tanh soft-capping of the output logits (Gemma2)
    parallel_block: bool = False  # x + attn(attn_norm(x)) + mlp(mlp_norm(x)): both read the
    # block's input, summed (GPT-NeoX, StableLM's parallel residual, Cohere, Phi)
    shared_norm: bool = False  # a parallel block's MLP reads attention's norm: one norm per
    # block, no mlp_norm (Cohere, Phi, StableLM); GPT-NeoX has two
    branches_first: bool = False  # a parallel block sums (attn + mlp) + x (Phi, GPT-NeoX), not
    # (x + attn) + mlp (Cohere, StableLM): the same in exact arithmetic, not in bf16
    layernorm: bool = False  # every norm is mean-centred LayerNorm instead of RMSNorm
    norm_bias: bool = False  # the block and final norms add a bias (LayerNorm's; StableLM, Phi)
    norm_params: bool = True  # False: the norms have no weight and no bias at all (OLMo)
    norm_moments: bool = False  # LayerNorm written out as (x - mean) * rsqrt(var + eps) * w in fp32
    # (Cohere), not torch's layer_norm (nn.LayerNorm): the same in exact arithmetic, not in fp32
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))), no gate
    lm_head_bias: bool = False  # the output projection adds a bias (Phi)
    logit_scale: float = 1.0  # logits * this (Cohere); not logits_divisor: x * s and x / (1 / s)
    # round differently, and the model computes what the family does
    clip_qkv: float | None = None  # q, k and v clamped to [-c, c] after projection (OLMo)
    clip_after_qk_norm: bool = False  # the clamp after the q/k norm instead of before it (OLMoE)
    interleaved_rope: bool = False  # rope on (even, odd) pairs instead of halves (GLM, Cohere)
    fp32_rope: bool = False  # q and k rotated in fp32 by fp32 cos/sin, then cast back (DeepSeek-V2's
    # complex rope), not in the model dtype: the same in fp32, not in bf16
    sliding_rope_parameters: Mapping[str, Any] | None = None  # the windowed layers' own rope (Gemma3)
    num_experts: int = 0  # a mixture of experts in place of the MLP; `moe` says how it routes
    moe: MoE | None = None  # None with experts: routing the spec does not describe
    alibi: bool = False  # ALiBi position bias instead of rope (Baichuan2-13B)
    normalized_head: bool = False  # lm_head rows L2-normalised before use (Baichuan2's NormHead)
    # Last, so that a refusal names an architectural feature before these; each is exact
    # for sequences no longer than its value (the window's, for the layers it is on).
    long_context_scaling: int | None = None  # Qwen v1: dynamic NTK and log-n attention beyond
    sliding_window: int | None = None  # attend to at most this many previous positions
    window_layers: tuple[int, ...] | None = None  # the layers the window is on; None is all (Gemma2)

    def __post_init__(self) -> None:
        if self.qk_norm_scope not in ("head", "each_head", "all"):
            raise ValueError(f"qk_norm_scope must be 'head', 'each_head' or 'all', "
                             f"not {self.qk_norm_scope!r}")
        # Sub-features of a feature that is off compute nothing: held at the default, so that a
        # family that fixes them (StableLM's q/k norm scope) compares equal when it is off.
        if not self.qk_norm:
            object.__setattr__(self, "qk_norm_scope", "head")
            object.__setattr__(self, "qk_norm_bias", False)
        if self.clip_qkv is None or not self.qk_norm:  # no clamp, or no norm to order it against
            object.__setattr__(self, "clip_after_qk_norm", False)
        if not self.parallel_block:
            object.__setattr__(self, "shared_norm", False)
            object.__setattr__(self, "branches_first", False)
        if not self.norm_params and self.norm_bias:
            raise ValueError("norm_bias needs norm_params: a norm without parameters has no bias")
        if not self.num_experts:
            object.__setattr__(self, "moe", None)
        if isinstance(self.moe, Mapping):  # from a unified config.json
            object.__setattr__(self, "moe", MoE(**self.moe))
        if self.moe is not None:
            object.__setattr__(self, "moe", self.moe.spelled(self.num_layers))
        if not self.latent_attention:
            object.__setattr__(self, "mla", None)
        if isinstance(self.mla, Mapping):
            object.__setattr__(self, "mla", MLA(**self.mla))
        if self.window_layers is not None:  # a list from JSON compares unequal to the tuple
            object.__setattr__(self, "window_layers", tuple(self.window_layers))

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of one layer (None: it attends to every previous position)."""
        on = self.window_layers is None or layer in self.window_layers
        return self.sliding_window if on else None

    def features(self) -> dict[str, Any]:
        """The named features (everything that is not a dimension), in declaration order."""
        return {name: getattr(self, name) for name in FEATURES}


DIMENSIONS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads", "head_dim", "max_position_embeddings", "norm_eps", "hidden_act",
    "rope_parameters", "tie_word_embeddings",
)
FEATURES = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.name not in DIMENSIONS)
# Llama's value of every feature: what a family holds unless one of its codecs says otherwise.
DEFAULT_FEATURES: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(ModelSpec) if f.name in FEATURES
}

# Features a converter can move into the weights (reference/converters/folds.py).
FOLDABLE = ("norm_offset", "embedding_multiplier", "attention_multiplier", "residual_multiplier",
            "logits_divisor", "normalized_head")

# Canonical names of the optional biases, per feature. A target that lacks the feature may
# still take the model when every such tensor is zero; a source that lacks it gets zeros.
BIAS_KEYS: dict[str, tuple[str, ...]] = {
    "qkv_bias": ("layers.{}.attn.q.bias", "layers.{}.attn.k.bias", "layers.{}.attn.v.bias"),
    "o_bias": ("layers.{}.attn.o.bias",),
    "mlp_bias": ("layers.{}.mlp.gate.bias", "layers.{}.mlp.up.bias", "layers.{}.mlp.down.bias"),
}


def linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out, in) features of each linear of a layer, by its canonical short name (q, ..., down)."""
    h, ff, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    rows = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (ff, h), "up": (ff, h),
            "down": (h, ff)}
    m = spec.mla
    if m is not None:  # latent attention's linears (MLA); a head's q and k are nope_dim + head_dim
        heads, qk = spec.num_heads, m.nope_dim + d
        rank = m.q_rank or 0
        rows.update(q=(heads * qk, h), q_a=(rank, h), q_b=(heads * qk, rank), kv_a=(m.kv_rank + d, h),
                    kv_b=(heads * (m.nope_dim + m.v_dim), m.kv_rank), o=(h, heads * m.v_dim))
    return rows


def canonical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every canonical tensor of a model of this spec: the one place shapes are
    computed, with `linear_shapes` (a test checks them against the unified model built on
    the meta device)."""
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    rows = linear_shapes(spec)
    experts: dict[str, dict[str, tuple[int, int]]] = {}
    if spec.moe is not None:  # the linears of a mixture's experts, its shared expert and router
        for kind, size in (("experts", spec.moe.expert_size), ("shared", spec.moe.shared_size)):
            experts[kind] = {"gate": (size, h), "up": (size, h), "down": (h, size)}
        experts["mlp"] = {"router": (spec.num_experts, h), "shared_gate": (1, h)}
    out: dict[str, tuple[int, ...]] = {}
    heads = {"q_norm": (spec.num_heads, q), "k_norm": (spec.num_kv_heads, kv)}
    latent = {"q_a_norm": (rows["q_a"][0],), "kv_a_norm": (spec.mla.kv_rank,)} if spec.mla else {}
    for name in canonical_names(spec):
        parts = name.split(".")
        if name in ("embed.weight", "lm_head.weight"):
            out[name] = (spec.vocab_size, h)
        elif name == "lm_head.bias":
            out[name] = (spec.vocab_size,)
        elif parts[-1] == "choice_bias":
            out[name] = (spec.num_experts,)
        elif parts[-2] in latent:
            out[name] = latent[parts[-2]]
        elif parts[-2] in heads:
            n, whole = heads[parts[-2]]
            out[name] = {"head": (d,), "each_head": (n, d), "all": (whole,)}[spec.qk_norm_scope]
        elif parts[-2].endswith("norm"):
            out[name] = (h,)
        elif parts[2] == "mlp" and (parts[3] in experts or parts[3] in experts.get("mlp", {})):
            kind = parts[3] if parts[3] in ("experts", "shared") else "mlp"
            out[name] = experts[kind][parts[-2]]
        elif parts[-1] == "bias":
            out[name] = rows[parts[-2]][:1]
        else:
            out[name] = rows[parts[-2]]
    return out


def bias_shape(spec: ModelSpec, name: str) -> tuple[int]:
    """Shape of a canonical bias (the output features of its linear), also one the spec lacks."""
    return linear_shapes(spec)[name.split(".")[-2]][:1]


def canonical_names(spec: ModelSpec) -> Iterator[str]:
    """Every canonical parameter name a model of this spec has, in a stable order."""
    def norm(name: str, on: bool = True, bias: bool = spec.norm_bias) -> Iterator[str]:
        if on and spec.norm_params:
            yield f"{name}.weight"
            if bias:
                yield f"{name}.bias"

    yield "embed.weight"
    for i in range(spec.num_layers):
        yield from norm(f"layers.{i}.attn_norm", spec.pre_norms)
        if spec.mla is not None:
            q = ("q",) if spec.mla.q_rank is None else ("q_a", "q_a_norm", "q_b")
            yield from (f"layers.{i}.attn.{p}.weight" for p in (*q, "kv_a", "kv_a_norm", "kv_b", "o"))
        for p in ("q", "k", "v", "o") if spec.mla is None else ():
            yield f"layers.{i}.attn.{p}.weight"
            if (spec.o_bias if p == "o" else spec.qkv_bias):
                yield f"layers.{i}.attn.{p}.bias"
        for p in ("q_norm", "k_norm"):
            yield from norm(f"layers.{i}.attn.{p}", spec.qk_norm, spec.qk_norm_bias)
        yield from norm(f"layers.{i}.attn_post_norm", spec.post_norms)
        yield from norm(f"layers.{i}.mlp_norm", spec.pre_norms and not spec.shared_norm)
        if spec.moe is not None and spec.moe.on(i):
            yield f"layers.{i}.mlp.router.weight"
            if spec.moe.choice_bias:
                yield f"layers.{i}.mlp.choice_bias"
            for e in range(spec.num_experts):
                yield from (f"layers.{i}.mlp.experts.{e}.{p}.weight" for p in ("gate", "up", "down"))
            if spec.moe.shared_size:
                yield from (f"layers.{i}.mlp.shared.{p}.weight" for p in ("gate", "up", "down"))
                if spec.moe.gated_shared:
                    yield f"layers.{i}.mlp.shared_gate.weight"
        else:
            for p in ("gate", "up", "down") if spec.gated_mlp else ("up", "down"):
                yield f"layers.{i}.mlp.{p}.weight"
                if spec.mlp_bias:
                    yield f"layers.{i}.mlp.{p}.bias"
        yield from norm(f"layers.{i}.mlp_post_norm", spec.post_norms)
    yield from norm("norm")
    if not spec.tie_word_embeddings:
        yield "lm_head.weight"
    if spec.lm_head_bias:
        yield "lm_head.bias"
