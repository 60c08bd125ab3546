"""HF config.json <-> ModelSpec, as data: field renames plus a few feature codecs."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reference.errors import InputError
from reference.families.spec import MLA, ModelSpec, MoE

# canonical field -> HF field, for every Llama-shaped config.
LLAMA_FIELDS: Mapping[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "hidden_act": "hidden_act",
    "tie_word_embeddings": "tie_word_embeddings",
}

# Fields that mean the same in every family and travel unchanged.
PASSTHROUGH = (
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "dtype",
)


# Where read_spec puts the text of the files a codec reads beside config.json (`Codec.files`):
# a view for reading, never written back.
FILES = "__files__"


class Codec:
    """How one family stores some features in its config: read them, name the values the
    family may hold (`variants`, for `reference families`), hold the nearest it can
    (`express`), write them, and name what it cannot write at all (`refuses`)."""

    def files(self) -> tuple[str, ...]:
        """Files beside config.json whose text `read` needs (in cfg[FILES], by name, when present)."""
        return ()

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        raise NotImplementedError

    def variants(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        raise NotImplementedError

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        raise NotImplementedError

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        return {}

    def switches(self) -> tuple[str, ...]:
        """Features a config turns on or off at will, whatever its class defaults to."""
        return ()


@dataclass(frozen=True)
class Flag(Codec):
    """Boolean features held in one HF field; several features may share it (Llama's
    `attention_bias` turns on q, k, v and o bias together)."""

    field: str
    features: tuple[str, ...]
    default: bool = False

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        value = bool(cfg.get(self.field, self.default))
        return dict.fromkeys(self.features, value)

    def variants(self) -> list[dict[str, Any]]:
        return [dict.fromkeys(self.features, True)]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return dict.fromkeys(self.features, any(getattr(spec, f) for f in self.features))

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.field: any(getattr(spec, f) for f in self.features)}


@dataclass(frozen=True)
class Fixed(Codec):
    """A feature the family always has at one value (Qwen2 always has q, k, v bias)."""

    feature: str
    value: Any

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {self.feature: self.value}

    def variants(self) -> list[dict[str, Any]]:
        return [{self.feature: self.value}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.feature: self.value}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Window(Codec):
    """A sliding window on every layer, in `sliding_window` (Mistral); Qwen2 also has a
    switch `use_sliding_window`. Gemma2/3 window only the layers `layer_types` says are
    "sliding_attention" (`mixed_layers`); the others attend to every position."""

    switch: str | None = None
    mixed_layers: bool = False

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        window = cfg.get("sliding_window")
        if self.switch is not None and not cfg.get(self.switch, False):
            window = None
        kinds = list(cfg.get("layer_types") or ())  # none listed: the window is on every layer
        windowed = tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
        some = 0 < len(windowed) < len(kinds)  # none windowed is no window (Qwen2's max_window_layers)
        if window is not None and some and not self.mixed_layers:
            raise InputError(f"{where}: a window on only some layers (layer_types) is not supported")
        if window is not None and window >= cfg.get("max_position_embeddings", window + 1):
            window = None  # a window no sequence can exceed computes nothing
        if window is None or (kinds and not windowed):
            return {"sliding_window": None, "window_layers": None}
        return {"sliding_window": window, "window_layers": windowed if some else None}

    def switches(self) -> tuple[str, ...]:
        # Mistral's class defaults to 4096; Mistral-7B-v0.3 says null
        return ("sliding_window", "window_layers") if self.mixed_layers else ("sliding_window",)

    def variants(self) -> list[dict[str, Any]]:
        return [{"sliding_window": 4096, **({"window_layers": (0,)} if self.mixed_layers else {})}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        if self.mixed_layers:
            return {"sliding_window": spec.sliding_window, "window_layers": spec.window_layers}
        return {"sliding_window": spec.sliding_window}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"sliding_window": spec.sliding_window}
        kinds = ["full_attention" if spec.window_of(i) is None else "sliding_attention"
                 for i in range(spec.num_layers)]
        if self.mixed_layers:
            out["layer_types"] = kinds
        if self.switch is not None:
            out[self.switch] = spec.sliding_window is not None
            out["max_window_layers"] = 0
            out["layer_types"] = kinds
        return out


@dataclass(frozen=True)
class Value(Codec):
    """A scalar feature held in one HF field (Granite's multipliers, Gemma2's softcaps)."""

    feature: str
    field: str
    default: Any = None

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {self.feature: cfg.get(self.field, self.default)}

    def variants(self) -> list[dict[str, Any]]:
        return [{self.feature: 2.0}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.feature: getattr(spec, self.feature)}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.field: getattr(spec, self.feature)}


@dataclass(frozen=True)
class Experts(Codec):
    """A mixture of experts (ModelSpec.num_experts and its `moe` record) in a family's
    fields: the count in `count` (or `count_also`, the name older configs use), each
    expert's size in `size`, the renormalisation of the top-k in `renormalise` (a field, or
    True where the family always renormalises), the shared expert's size in `shared`, and
    Qwen-MoE's layer pattern (decoder_sparse_step, mlp_only_layers) where `layers`. What a
    family has no field for it holds at its one value."""

    count: str
    size: str
    default: int
    renormalise: str | bool
    fp32_weights: bool = False
    shared: str | None = None
    layers: bool = False
    count_also: str | None = None

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        n = cfg.get(self.count, cfg.get(self.count_also or self.count, self.default))
        renormalise = (self.renormalise if isinstance(self.renormalise, bool)
                       else bool(cfg.get(self.renormalise, False)))
        moe = MoE(top_k=cfg["num_experts_per_tok"], expert_size=cfg[self.size],
                  norm_topk_prob=renormalise, fp32_weights=self.fp32_weights,
                  shared_size=cfg.get(self.shared, 0) if self.shared else 0,
                  sparse_step=cfg.get("decoder_sparse_step", 1) if self.layers else 1,
                  dense_layers=tuple(cfg.get("mlp_only_layers") or ()) if self.layers else ())
        return {"num_experts": n, "moe": moe}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        if spec.moe is None:  # a dense MLP, or routing unknown here: the family's own mixture instead
            return {"num_experts": self.default, "moe": MoE(top_k=1, expert_size=spec.intermediate_size)}
        m = spec.moe
        fixed = self.renormalise if isinstance(self.renormalise, bool) else m.norm_topk_prob
        return {"num_experts": spec.num_experts, "moe": MoE(
            top_k=m.top_k, expert_size=m.expert_size, norm_topk_prob=fixed, fp32_weights=self.fp32_weights,
            shared_size=m.shared_size if self.shared else 0,
            sparse_step=m.sparse_step if self.layers else 1,
            dense_layers=m.dense_layers if self.layers else ())}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        assert spec.moe is not None  # express holds a mixture, and only a held spec is written
        m = spec.moe
        out: dict[str, Any] = {self.count: spec.num_experts, "num_experts_per_tok": m.top_k,
                               self.size: m.expert_size}
        if isinstance(self.renormalise, str):
            out[self.renormalise] = m.norm_topk_prob
        if self.shared:
            out[self.shared] = m.shared_size
        if self.layers:
            out.update(decoder_sparse_step=m.sparse_step, mlp_only_layers=list(m.dense_layers))
        return out

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        m = spec.moe
        if m is not None and self.size == "intermediate_size" and m.expert_size != spec.intermediate_size:
            return {"moe": f"experts of {m.expert_size} rows beside a dense size of {spec.intermediate_size}"}
        if m is not None and self.shared and not m.shared_size:  # Qwen2-MoE's class always builds one
            return {"moe": f"no shared expert, where {self.shared} 0 still makes a shared expert's gate"}
        return {}


@dataclass(frozen=True)
class Latent(Codec):
    """DeepSeek's multi-head latent attention (ModelSpec.latent_attention and its `mla` record):
    q_lora_rank (null: one q projection), kv_lora_rank, qk_nope_head_dim, v_head_dim; the rope
    part of a head, qk_rope_head_dim, is the spec's head_dim (as transformers' config sets it)."""

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        mla = MLA(q_rank=cfg.get("q_lora_rank"), kv_rank=cfg["kv_lora_rank"],
                  nope_dim=cfg["qk_nope_head_dim"], v_dim=cfg["v_head_dim"])
        # one key and value per query head (kv_b makes them): transformers' class fails on any other
        # num_key_value_heads, so none other is read
        return {"latent_attention": True, "mla": mla, "head_dim": cfg["qk_rope_head_dim"],
                "num_kv_heads": cfg["num_attention_heads"]}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        mla = spec.mla or MLA(q_rank=None, kv_rank=spec.head_dim, nope_dim=0, v_dim=spec.head_dim)
        return {"latent_attention": True, "mla": mla}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        assert spec.mla is not None  # express holds one, and only a held spec is written
        m = spec.mla
        return {"q_lora_rank": m.q_rank, "kv_lora_rank": m.kv_rank, "qk_nope_head_dim": m.nope_dim,
                "qk_rope_head_dim": spec.head_dim, "v_head_dim": m.v_dim,
                "qk_head_dim": m.nope_dim + spec.head_dim, "head_dim": spec.head_dim}

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        if spec.num_kv_heads != spec.num_heads:
            return {"num_kv_heads": f"num_kv_heads={spec.num_kv_heads}: latent attention has one KV head per "
                                    f"query head ({spec.num_heads})"}
        return {}


def _first_mixture(spec: ModelSpec, m: MoE) -> int:
    """The first layer whose MLP is the mixture (num_layers if none is)."""
    return next((i for i in range(spec.num_layers) if m.on(i)), spec.num_layers)


@dataclass(frozen=True)
class DeepSeekExperts(Codec):
    """DeepSeek's mixture (ModelSpec.num_experts and its `moe` record): n_routed_experts of
    moe_intermediate_size, n_shared_experts fused into one ungated shared expert, the first
    first_k_dense_replace layers dense, routed_scaling_factor, routers in fp32 and fp32 weights.
    V2 scores by softmax and limits the choice to groups under topk_method
    "group_limited_greedy" (`grouped_by`; "greedy" ignores groups), a group scored by its best
    expert; V3 ("noaux_tc", `grouped_by` None: always) scores by sigmoid, chooses with its
    e_score_correction_bias, and scores a group by its best two. transformers' V2 class ignores
    norm_topk_prob and moe_layer_freq: a config that needs them is refused by name."""

    default: int
    scoring: str
    group_score: str
    grouped_by: str | None
    choice_bias: bool
    renormalise: bool  # whether the family's class honours norm_topk_prob (V3)

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        if not self.renormalise and cfg.get("norm_topk_prob"):
            raise InputError(f"{where}: norm_topk_prob=True, which transformers' class ignores; "
                             "not supported")
        if cfg.get("moe_layer_freq", 1) != 1:
            raise InputError(f"{where}: moe_layer_freq={cfg['moe_layer_freq']!r} (experts every nth layer), "
                             "which transformers' class ignores; not supported")
        size = cfg["moe_intermediate_size"]
        grouped = self.grouped_by is None or cfg.get("topk_method") == self.grouped_by
        moe = MoE(top_k=cfg["num_experts_per_tok"], expert_size=size,
                  norm_topk_prob=bool(cfg.get("norm_topk_prob")) if self.renormalise else False,
                  fp32_weights=True, shared_size=size * (cfg.get("n_shared_experts") or 0),
                  dense_layers=tuple(range(cfg.get("first_k_dense_replace") or 0)),
                  scoring=self.scoring, groups=(cfg.get("n_group") or 1) if grouped else 1,
                  top_groups=(cfg.get("topk_group") or 1) if grouped else 1, group_score=self.group_score,
                  choice_bias=self.choice_bias, scale=float(cfg.get("routed_scaling_factor", 1.0)),
                  fp32_router=True, gated_shared=False)
        return {"num_experts": cfg.get("n_routed_experts", self.default), "moe": moe}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        m = spec.moe or MoE(top_k=1, expert_size=spec.intermediate_size)
        # the layers before the first mixture dense, the rest mixtures (ModelSpec spells it)
        return {"num_experts": spec.num_experts or self.default, "moe": MoE(
            top_k=m.top_k, expert_size=m.expert_size, norm_topk_prob=m.norm_topk_prob and self.renormalise,
            fp32_weights=True, shared_size=m.shared_size, dense_layers=tuple(range(_first_mixture(spec, m))),
            scoring=self.scoring, groups=m.groups, top_groups=m.top_groups, group_score=self.group_score,
            choice_bias=self.choice_bias, scale=m.scale, fp32_router=True, gated_shared=False)}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        assert spec.moe is not None  # express holds a mixture, and only a held spec is written
        m = spec.moe
        out: dict[str, Any] = {
            "n_routed_experts": spec.num_experts, "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.expert_size, "n_shared_experts": m.shared_size // m.expert_size,
            "first_k_dense_replace": _first_mixture(spec, m), "routed_scaling_factor": m.scale,
            "norm_topk_prob": m.norm_topk_prob}
        if self.grouped_by is None or m.groups > 1:  # else greedy: the groups are not read
            out.update(n_group=m.groups, topk_group=m.top_groups)
            if self.grouped_by is not None:
                out["topk_method"] = self.grouped_by
        return out

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        m = spec.moe
        if m is not None and m.shared_size % m.expert_size:
            return {"moe": f"a shared expert of {m.shared_size} rows, not a multiple of the experts' "
                           f"{m.expert_size}"}
        return {}


@dataclass(frozen=True)
class Implied(Codec):
    """A dimension the family's config has no field for: its class always uses `value` (OLMo's
    norm eps), or with `value` None what read_spec derives from the others when the field is
    absent (GPT-NeoX's head_dim is hidden / heads, its KV heads are the heads). A spec with
    another value cannot be written: refused naming the dimension."""

    dimension: str
    value: Any = None

    def _implied(self, spec: ModelSpec) -> Any:
        if self.value is not None:
            return self.value
        derived = {"head_dim": spec.hidden_size // spec.num_heads, "num_kv_heads": spec.num_heads}
        return derived[self.dimension]

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {} if self.value is None else {self.dimension: self.value}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        have, want = getattr(spec, self.dimension), self._implied(spec)
        if have == want:
            return {}
        return {self.dimension: f"{self.dimension}={have!r}: the family's config has no field for it, "
                                f"so it is always {want!r}"}


@dataclass(frozen=True)
class AttentionScale(Value):
    """Granite's `attention_multiplier`: the q.k scale itself, so Llama's None is 1/sqrt(d)."""

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        scale = spec.attention_multiplier
        return {self.field: spec.head_dim ** -0.5 if scale is None else scale}


@dataclass(frozen=True)
class QueryScalar(Codec):
    """Gemma2/3's `query_pre_attn_scalar` s: q.k is scaled by s ** -0.5, so s == head_dim is
    Llama's scale (held as None) and any other s is an attention_multiplier."""

    field: str = "query_pre_attn_scalar"

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        s = cfg.get(self.field)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return {"attention_multiplier": None if s is None or s == head_dim else s ** -0.5}

    def variants(self) -> list[dict[str, Any]]:
        return [{"attention_multiplier": 256 ** -0.5}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {"attention_multiplier": spec.attention_multiplier}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        if spec.attention_multiplier is None:
            return {self.field: spec.head_dim}
        s = spec.attention_multiplier ** -2
        return {self.field: round(s) if math.isclose(s, round(s), rel_tol=1e-12) else s}


@dataclass(frozen=True)
class LayerTypeRope(Codec):
    """Rope per layer type, {"full_attention": ..., "sliding_attention": ...} (Gemma3): the full
    layers' is the spec's rope_parameters, the windowed layers' sliding_rope_parameters."""

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        rope = cfg.get("rope_parameters") or {}
        if "full_attention" not in rope:
            return {}
        full, fraction = read_rope({"rope_parameters": rope["full_attention"]})
        sliding, _ = read_rope({"rope_parameters": rope.get("sliding_attention", full)})
        window = cfg.get("sliding_window")
        unplaced = window is None or window >= cfg.get("max_position_embeddings", window + 1)
        if sliding != full and unplaced and "sliding_attention" in (cfg.get("layer_types") or ()):
            # the spec places the windowed layers' rope by their window, which this config lacks
            raise InputError(f"{where}: rope_parameters differ per layer type, but sliding_window "
                                 f"{window} does not mark the 'sliding_attention' layers; not supported")
        return {"rope_parameters": full, "rotary_fraction": fraction,
                "sliding_rope_parameters": None if sliding == full else sliding}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {"sliding_rope_parameters": spec.sliding_rope_parameters}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        full = dict(spec.rope_parameters)
        return {"rope_parameters": {"full_attention": full,
                                    "sliding_attention": dict(spec.sliding_rope_parameters or full)}}


@dataclass(frozen=True)
class Derived(Codec):
    """A feature the family fixes as a power of a dimension (Gemma scales embeddings by
    sqrt(hidden_size))."""

    feature: str
    dimension: str
    power: float

    def _value(self, size: int) -> float:
        return float(size) ** self.power

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {self.feature: self._value(cfg[self.dimension])}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.feature: self._value(getattr(spec, self.dimension))}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class RotaryFraction(Codec):
    """Partial rotary, stored as `partial_rotary_factor` inside rope_parameters (Phi3, GLM);
    `default` is what the family's config class assumes when it is absent (GLM's: 0.5)."""

    default: float = 1.0

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {}  # read_rope takes it out of the rope parameters for every family

    def variants(self) -> list[dict[str, Any]]:
        return [{"rotary_fraction": 0.5}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {"rotary_fraction": spec.rotary_fraction}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        rope = dict(spec.rope_parameters)
        if spec.rotary_fraction != self.default:
            rope["partial_rotary_factor"] = spec.rotary_fraction
        return {"rope_parameters": rope}


@dataclass(frozen=True)
class Scaled(Codec):
    """A dimension stored times a factor (Qwen v1 stores twice the MLP width)."""

    dimension: str
    field: str
    factor: int

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {self.dimension: cfg[self.field] // self.factor}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.field: getattr(spec, self.dimension) * self.factor}


@dataclass(frozen=True)
class LegacyRope(Codec):
    """Rope as remote-code checkpoints store it: a base field (and `rope_scaling`), not
    transformers 5's `rope_parameters`. Only plain rope is written back."""

    base: str = "rope_theta"

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        rope, fraction = read_rope({**cfg, "rope_theta": cfg.get(self.base, 10000.0)})
        return {"rope_parameters": rope, "rotary_fraction": fraction}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        rope = dict(spec.rope_parameters)
        rope.pop("rope_theta", None)
        if rope.pop("rope_type", "default") != "default" or rope:
            return {"rope_parameters": f"rope scaling {dict(spec.rope_parameters)} cannot be written as "
                                       f"{self.base} (only a plain rope base)"}
        return {}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.base: spec.rope_parameters["rope_theta"], "rope_parameters": None}


@dataclass(frozen=True)
class LongContext(Codec):
    """Qwen v1's `use_dynamic_ntk` / `use_logn_attn`, which act beyond `seq_length` only."""

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        ntk, logn = bool(cfg.get("use_dynamic_ntk")), bool(cfg.get("use_logn_attn"))
        if ntk != logn:  # every published Qwen config turns both on, or neither
            raise InputError(f"{where}: use_dynamic_ntk={ntk} but use_logn_attn={logn}; "
                                 "only both on or both off is supported")
        return {"long_context_scaling": cfg.get("seq_length", 2048) if ntk else None}

    def variants(self) -> list[dict[str, Any]]:
        return [{"long_context_scaling": 8192}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {"long_context_scaling": spec.long_context_scaling}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        on = spec.long_context_scaling is not None
        length = spec.long_context_scaling if on else spec.max_position_embeddings
        return {"use_dynamic_ntk": on, "use_logn_attn": on, "seq_length": length}


@dataclass(frozen=True)
class BaichuanPositions(Codec):
    """Baichuan2-7B uses rope; Baichuan-13B and Baichuan2-13B use ALiBi, and their published
    configs carry no max_position_embeddings (vLLM tells them apart by hidden_size 4096)."""

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        alibi = "max_position_embeddings" not in cfg and cfg.get("hidden_size") != 4096
        return {"alibi": alibi}

    def variants(self) -> list[dict[str, Any]]:
        return [{"alibi": True}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {"alibi": spec.alibi}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Unsupported(Codec):
    """A config field whose value other than `holds` (`default` when absent or null) describes a
    model no spec holds (ChatGLM's LayerNorm, residual after the norm, 2D positions; Gemma's
    use_bidirectional_attention): refused by name on reading; written as `holds`."""

    field: str
    holds: Any
    what: str
    default: Any = None

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        value = cfg.get(self.field)
        value = self.default if value is None else value
        if value != self.holds:
            raise InputError(f"{where}: {self.field}={value!r} ({self.what}) is not supported")
        return {}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {} if self.holds is None else {self.field: self.holds}


@dataclass(frozen=True)
class Grouped(Codec):
    """KV heads held as a switch and a count (ChatGLM's multi_query_attention and
    multi_query_group_num): with the switch off, every head has its own."""

    switch: str
    field: str

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        if not cfg.get(self.switch):
            return {"num_kv_heads": cfg["num_attention_heads"]}
        if cfg.get(self.field) is None:
            raise InputError(f"{where}: {self.switch} is on but '{self.field}' is missing")
        return {"num_kv_heads": cfg[self.field]}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.switch: spec.num_kv_heads != spec.num_heads, self.field: spec.num_kv_heads}


@dataclass(frozen=True)
class Implies(Codec):
    """A boolean feature held in its own field, also on when another field is (ChatGLM's
    add_bias_linear puts a bias on every linear, q, k and v included)."""

    field: str
    feature: str
    by: str
    by_features: tuple[str, ...]

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        return {self.feature: bool(cfg.get(self.field) or cfg.get(self.by))}

    def variants(self) -> list[dict[str, Any]]:
        return [{self.feature: True}]

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.feature: any(getattr(spec, f) for f in (self.feature, *self.by_features))}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.field: getattr(spec, self.feature)}


@dataclass(frozen=True)
class RopeRatio(Codec):
    """ChatGLM's `rope_ratio` on a rope of base `theta`, which the published modeling code reads
    two ways: ChatGLM3 and GLM-4 multiply the base by it, ChatGLM2-32k divides the positions by
    it (linear scaling). Which one, the checkpoint's own `code` file says (read as text, never
    run); without that file only a ratio of 1 is read. Written back as the ratio either way:
    the modeling file travels with the checkpoint's side files."""

    field: str = "rope_ratio"
    code: str = "modeling_chatglm.py"
    theta: float = 10000.0
    # Source patterns of the two readings in the published modeling files.
    scales_base: str = r"base\s*=\s*base\s*\*\s*self\.rope_ratio"
    scales_positions: str = r"/\s*self\.rope_ratio"

    def files(self) -> tuple[str, ...]:
        return (self.code,)

    def read(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        ratio = cfg.get(self.field) or 1
        if ratio == 1:
            return {"rope_parameters": {"rope_type": "default", "rope_theta": self.theta}}
        text = (cfg.get(FILES) or {}).get(self.code)
        if text is None:
            raise InputError(f"{where}: {self.field}={ratio!r} without {self.code} beside config.json: "
                             "ChatGLM3 / GLM-4 multiply the rope base by it, ChatGLM2-32k divides the "
                             "positions by it, and only the modeling file says which; not supported")
        base, positions = (re.search(p, text) is not None for p in (self.scales_base, self.scales_positions))
        if base == positions:
            raise InputError(f"{where}: {self.code} does not show whether {self.field}={ratio!r} scales "
                             "the rope base or the positions; not supported")
        if base:
            return {"rope_parameters": {"rope_type": "default", "rope_theta": self.theta * ratio}}
        return {"rope_parameters": {"rope_type": "linear", "factor": float(ratio), "rope_theta": self.theta}}

    def variants(self) -> list[dict[str, Any]]:
        return []

    def express(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        rope = dict(spec.rope_parameters)
        kind, theta = rope.pop("rope_type", "default"), rope.pop("rope_theta")
        factor = rope.pop("factor", None)
        plain = kind == "default" and factor is None
        linear = kind == "linear" and theta == self.theta
        if (plain or linear) and not rope:
            return {}
        return {"rope_parameters": f"rope {dict(spec.rope_parameters)} cannot be written as {self.field} "
                                   f"(a base of {self.theta:g} times it, or linear scaling by it)"}

    def write(self, spec: ModelSpec) -> dict[str, Any]:
        rope = spec.rope_parameters
        ratio = rope["factor"] if rope.get("rope_type") == "linear" else rope["rope_theta"] / self.theta
        return {self.field: int(ratio) if float(ratio).is_integer() else ratio, "rope_parameters": None}


def read_rope(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
    """Rope parameters without the partial-rotary factor, and that factor: from transformers 5
    `rope_parameters`, or the 4.x `rope_theta` + `rope_scaling` pair."""
    if cfg.get("rope_parameters"):
        rope = dict(cfg["rope_parameters"])
    else:
        rope = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
        if "type" in rope:
            rope["rope_type"] = rope.pop("type")
        rope["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
    fraction = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return rope, float(fraction)


def read_spec(
    cfg: Mapping[str, Any],
    fields: Mapping[str, str],
    codecs: tuple[Codec, ...],
    where: str,
    tie_default: bool = False,
    files: Mapping[str, str] | None = None,
) -> ModelSpec:
    """A ModelSpec from an HF config dict (and the text of the files beside it its codecs read)."""
    values: dict[str, Any] = {}
    for name, hf in fields.items():
        if hf in cfg and cfg[hf] is not None:
            values[name] = cfg[hf]
    values.setdefault("tie_word_embeddings", tie_default)
    values.setdefault("hidden_act", "silu")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
    for name in required:
        if name not in values:
            raise InputError(f"{where}: missing field '{fields[name]}'")
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
    values.setdefault("max_position_embeddings", 2048)
    values.setdefault("norm_eps", 1e-6)
    values["rope_parameters"], values["rotary_fraction"] = read_rope(cfg)
    view = {**cfg, FILES: dict(files or {})}
    for codec in codecs:
        values.update(codec.read(view, where))
    return ModelSpec(**values)


def write_fields(spec: ModelSpec, fields: Mapping[str, str], codecs: tuple[Codec, ...]) -> dict[str, Any]:
    """The HF config fields for a spec the family can express."""
    out = {hf: getattr(spec, name) for name, hf in fields.items()}
    out["rope_parameters"] = dict(spec.rope_parameters)
    for codec in codecs:
        out.update(codec.write(spec))  # RotaryFraction replaces rope_parameters
    if out.get("rope_parameters", {}) is None:
        del out["rope_parameters"]  # LegacyRope wrote it its own way
    return out
