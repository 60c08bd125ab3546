"""Hypothesis over each family's own codecs: a random config that the family's transformers
config class accepts (shapes and the features its codecs and switches may hold) gives the same
logits from the unified model as from the transformers class, in fp32 at assert_close defaults.

The features drawn are read off the family's row: each codec type has a strategy below, so a
family with a new combination of codecs is drawn with no change here, and a new codec type
fails `test_every_codec_of_a_held_family_has_a_strategy` until it has one.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import UNIFIED_HELD
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from reference.errors import InputError
from reference.families.config import (
    AttentionScale,
    Codec,
    DeepSeekExperts,
    Derived,
    Experts,
    Fixed,
    Flag,
    Implied,
    Latent,
    LayerTypeRope,
    QueryScalar,
    RotaryFraction,
    Unsupported,
    Value,
    Window,
)
from reference.families.keymap import Fused
from reference.families.registry import FAMILIES
from reference.modeling import UnifiedForCausalLM
from reference.tiny import logits, tiny_config, tiny_model

SEQ = 24  # tokens: longer than every window drawn (2-8) and than max_position_embeddings 16
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
# Values of each scalar feature a Value codec holds (None: the feature off).
VALUES: dict[str, tuple[Any, ...]] = {
    "embedding_multiplier": (1.0, 0.5, 12.0),
    "attention_multiplier": (0.0078125, 0.125, 0.5),
    "residual_multiplier": (1.0, 0.22),
    "logits_divisor": (1.0, 8.0),
    "final_softcap": (None, 2.0, 30.0),
    "attn_softcap": (None, 1.0, 50.0),
    "logit_scale": (0.0625, 1.0, 2.0),
    "clip_qkv": (None, 0.5, 4.0),
}
# Config switches a family's class takes that no codec reads, drawn as well: the unified model
# must compute the same whatever they say (Gemma3's attention never applies its softcap field).
SWITCHES: dict[str, dict[str, st.SearchStrategy]] = {
    "gemma3_text": {"attn_logit_softcapping": st.sampled_from([None, 1.0])},
}


class Shape:
    """The dimensions drawn for one example, which the feature strategies depend on."""

    def __init__(self, layers: int, head_dim: int, fraction: float, max_pos: int,
                 partial: bool = False, heads: int = 1) -> None:
        self.layers, self.head_dim, self.fraction, self.max_pos = layers, head_dim, fraction, max_pos
        self.heads = heads
        self.partial = partial  # the family has partial rotary (a RotaryFraction codec)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.fraction)


def _flag(draw: st.DrawFn, codec: Flag, shape: Shape) -> dict[str, Any]:
    return {codec.field: draw(st.booleans())}


def _value(draw: st.DrawFn, codec: Value, shape: Shape) -> dict[str, Any]:
    return {codec.field: draw(st.sampled_from(VALUES[codec.feature]))}


def _window(draw: st.DrawFn, codec: Window, shape: Shape) -> dict[str, Any]:
    if codec.switch is not None:  # Qwen2/3: the switch, and the window from max_window_layers on
        window = draw(st.none() | st.integers(2, 8))
        return {codec.switch: window is not None, "sliding_window": window or 4096,
                "max_window_layers": draw(st.integers(0, shape.layers))}
    if codec.mixed_layers:  # Gemma2/3: a window on the layers layer_types says
        kinds = st.sampled_from(["sliding_attention", "full_attention"])
        return {"sliding_window": draw(st.integers(2, 8)),
                "layer_types": draw(st.lists(kinds, min_size=shape.layers, max_size=shape.layers))}
    return {"sliding_window": draw(st.none() | st.integers(2, 8))}


def _query_scalar(draw: st.DrawFn, codec: QueryScalar, shape: Shape) -> dict[str, Any]:
    return {codec.field: draw(st.sampled_from([shape.head_dim, 24, 256]))}


def _unsupported(draw: st.DrawFn, codec: Unsupported, shape: Shape) -> dict[str, Any]:
    # the value the family holds, or another: the unified model must refuse that one by name
    return {codec.field: draw(st.sampled_from([codec.holds, not codec.holds]))}


def _none(draw: st.DrawFn, codec: Codec, shape: Shape) -> dict[str, Any]:
    return {}


# RotaryFraction is drawn with the rope (rope_parameters' partial_rotary_factor), LayerTypeRope
# as the rope of each layer type; Fixed, Derived and Implied leave nothing to draw.
def _experts(draw: st.DrawFn, codec: Experts, shape: Shape) -> dict[str, Any]:
    """A mixture's size, top-k, renormalisation, shared expert and dense layers, as the family has them."""
    n = draw(st.integers(2, 6))
    out: dict[str, Any] = {codec.count: n, "num_experts_per_tok": draw(st.integers(1, min(n, 3)))}
    if codec.size != "intermediate_size":
        out[codec.size] = draw(st.integers(4, 40))
    if isinstance(codec.renormalise, str):
        out[codec.renormalise] = draw(st.booleans())
    if codec.shared:
        out[codec.shared] = draw(st.integers(4, 40))
    if codec.layers:
        out["decoder_sparse_step"] = draw(st.integers(1, 2))
        out["mlp_only_layers"] = draw(st.lists(st.integers(0, shape.layers - 1), unique=True, max_size=1))
    return out


def _latent(draw: st.DrawFn, codec: Latent, shape: Shape) -> dict[str, Any]:
    """MLA's ranks and head parts; rope on the drawn head_dim, one KV head per query head. The
    latent rank is even: V2's complex rope views the rope key's rows in pairs."""
    return {"qk_rope_head_dim": shape.rotary_dim, "head_dim": None, "num_key_value_heads": shape.heads,
            "q_lora_rank": draw(st.none() | st.integers(4, 32)), "kv_lora_rank": 2 * draw(st.integers(2, 16)),
            "qk_nope_head_dim": draw(st.sampled_from([4, 8, 12])),
            "v_head_dim": draw(st.sampled_from([4, 8, 16]))}


def _deepseek_experts(draw: st.DrawFn, codec: DeepSeekExperts, shape: Shape) -> dict[str, Any]:
    """DeepSeek's mixture: groups of 2 or 3 experts (V3 scores a group by its best two), any
    number of them kept, a top-k up to 4 (beyond the kept experts, too), dense first layers."""
    groups, per = draw(st.integers(1, 3)), draw(st.integers(2, 3))
    n = groups * per
    out: dict[str, Any] = {
        "n_routed_experts": n, "num_experts_per_tok": draw(st.integers(1, min(n, 4))),
        "moe_intermediate_size": draw(st.integers(4, 40)), "n_shared_experts": draw(st.integers(1, 2)),
        "first_k_dense_replace": draw(st.integers(0, shape.layers)), "n_group": groups,
        "topk_group": draw(st.integers(1, groups)),
        "routed_scaling_factor": draw(st.sampled_from([1.0, 2.5]))}
    if codec.renormalise:
        out["norm_topk_prob"] = draw(st.booleans())
    if codec.grouped_by is not None:
        out["topk_method"] = draw(st.sampled_from(["greedy", codec.grouped_by]))
    return out


STRATEGIES: dict[type, Callable[[st.DrawFn, Any, Shape], dict[str, Any]]] = {
    Flag: _flag, Value: _value, AttentionScale: _value, Window: _window, QueryScalar: _query_scalar,
    Unsupported: _unsupported, Experts: _experts, Latent: _latent, DeepSeekExperts: _deepseek_experts,
    RotaryFraction: _none, LayerTypeRope: _none, Fixed: _none, Derived: _none, Implied: _none,
}


@functools.cache
def rope_types(family: str) -> tuple[str, ...]:
    """The rope types the family's config class accepts (Phi3's takes longrope only)."""
    out = []
    for kind in ROPE_TYPES:
        rope = {"rope_type": kind, "rope_theta": 1e4, **_rope_args(kind, Shape(2, 16, 1.0, 16))}
        if any(isinstance(c, LayerTypeRope) for c in FAMILIES[family].codecs):
            rope = {"full_attention": rope, "sliding_attention": rope}
        try:
            tiny_config(family, rope_parameters=rope, original_max_position_embeddings=8)
        except Exception:  # transformers raises several types
            continue
        out.append(kind)
    return tuple(out)


def _rope_args(kind: str, shape: Shape, factor: float = 2.0, original: int = 8) -> dict[str, Any]:
    """The parameters each rope type needs, for a head of `shape`."""
    half = shape.rotary_dim // 2
    return {
        "default": {},
        "linear": {"factor": factor},
        "dynamic": {"factor": factor},
        "yarn": {"factor": factor, "original_max_position_embeddings": original},
        "longrope": {"short_factor": [1.0 + i / 8 for i in range(half)],
                     "long_factor": [factor + i / 4 for i in range(half)],
                     "original_max_position_embeddings": original},
        "llama3": {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": original},
        "proportional": {"factor": factor},
    }[kind]


@st.composite
def ropes(draw: st.DrawFn, family: str, shape: Shape) -> dict[str, Any]:
    kind = draw(st.sampled_from(rope_types(family)))
    args = _rope_args(kind, shape, draw(st.sampled_from([2.0, 4.0])), draw(st.sampled_from([8, 12])))
    rope = {"rope_type": kind, "rope_theta": draw(st.sampled_from([1e4, 5e5])), **args}
    if shape.partial:  # always said: a class may default to another (StableLM's 0.25)
        rope["partial_rotary_factor"] = shape.fraction
    return rope


@st.composite
def configs(draw: st.DrawFn, family: str) -> dict[str, Any]:
    """Overrides of the family's tiny config: shapes, rope, and every codec's features."""
    row = FAMILIES[family]
    names = dict(row.fields)  # canonical -> the family's own field names
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3)) if "num_kv_heads" in names else draw(st.integers(1, 6))
    # A class that fuses matmuls (Phi3's qkv_proj, GLM's gate_up_proj) rounds differently from
    # the split ones at some small widths (the BLAS kernel differs: 8 or 10 output features, not
    # 12 or 16): fused parts get widths in multiples of 16, as every published model has. Its
    # activation also reads a strided half of gate_up, where torch's silu and gelu kernels round
    # differently from the contiguous gate the unified model has: no field of the spec says so
    # yet, so those classes are drawn with the activations that round alike (relu, gelu_new).
    fused = any(isinstance(rule, Fused) for rule in row.keys.rules.values())
    if "head_dim" in names:  # mostly not hidden / heads
        hidden = heads * draw(st.sampled_from([4, 8, 12]))
        head_dim = 16 if fused else draw(st.sampled_from([8, 12, 16]))
    else:
        hidden = heads * draw(st.sampled_from([8, 12, 16]))
        head_dim = hidden // heads
    # rope on at least 4 dims, an even number (an odd or 2-dim rotary computes nothing sensible)
    fractions = [f for f in (0.25, 0.5, 1.0) if head_dim * f % 2 == 0 and head_dim * f >= 4]
    partial = any(isinstance(c, RotaryFraction) for c in row.codecs)
    fraction = draw(st.sampled_from(fractions)) if partial else 1.0
    shape = Shape(draw(st.integers(1, 3)), head_dim, fraction, max_pos=draw(st.sampled_from([16, 64])),
                  partial=partial, heads=heads)
    out: dict[str, Any] = {
        "num_hidden_layers": shape.layers, "num_attention_heads": heads, "hidden_size": hidden,
        "num_key_value_heads": kv if "num_kv_heads" in names else None,
        "head_dim": head_dim if "head_dim" in names else None,
        "intermediate_size": draw(st.sampled_from([16, 32, 48]) if fused else st.integers(8, 48)),
        "vocab_size": draw(st.integers(17, 300).filter(lambda v: v % 128)),
        "max_position_embeddings": shape.max_pos,
        names["hidden_act"]: draw(st.sampled_from(["relu", "gelu_new"] if fused else
                                                  ["silu", "gelu_pytorch_tanh", "gelu", "relu"])),
    }
    if "norm_eps" in names:
        out[names["norm_eps"]] = draw(st.sampled_from([1e-5, 1e-6]))
    if any(isinstance(c, LayerTypeRope) for c in row.codecs):  # Gemma3: one rope per layer type
        out["rope_parameters"] = {"full_attention": draw(ropes(family, shape)),
                                  "sliding_attention": draw(ropes(family, shape))}
    else:
        rope = out["rope_parameters"] = draw(ropes(family, shape))
        if "original_max_position_embeddings" in rope:  # Phi3 reads it from the top level
            out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    for codec in row.codecs:
        out.update(STRATEGIES[type(codec)](draw, codec, shape))
    for name, strategy in SWITCHES.get(family, {}).items():
        out[name] = draw(strategy)
    return out


def _refusal(family: str, overrides: dict[str, Any]) -> str | None:
    """The field a refusal of these overrides must name, or None when they must load."""
    refused = [c.field for c in FAMILIES[family].codecs
               if isinstance(c, Unsupported) and c.field in overrides and overrides[c.field] != c.holds]
    return refused[0] if refused else None


def check(family: str, tie: bool, seed: int, overrides: dict[str, Any]) -> None:
    original = tiny_model(family, tie=tie, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, original.config.vocab_size, (2, SEQ), generator=g)
    try:
        want = logits(original, ids)
    except (RuntimeError, ZeroDivisionError):  # the class accepts it but cannot run it (StableLM
        reject()  # slices its rotary dims, which proportional rope does not shrink): no reference
    with tempfile.TemporaryDirectory() as tmp:
        original.save_pretrained(tmp)
        refused = _refusal(family, overrides)
        if refused is not None:
            with pytest.raises(InputError, match=refused):
                UnifiedForCausalLM.from_pretrained(tmp, attn_implementation="eager")
            return
        model = UnifiedForCausalLM.from_pretrained(tmp, attn_implementation="eager")
        got = logits(model, ids)
    torch.testing.assert_close(got, want, msg=lambda m: f"{family} {json.dumps(overrides)}:\n{m}")


@pytest.mark.parametrize("family", UNIFIED_HELD)  # every held family has a transformers class
def test_unified_equals_the_family_class_on_any_config_it_accepts(family: str) -> None:
    @settings(max_examples=10, deadline=None, derandomize=True, database=None)
    @given(overrides=configs(family), tie=st.booleans(), seed=st.integers(0, 99))
    def run(overrides: dict[str, Any], tie: bool, seed: int) -> None:
        check(family, tie, seed, overrides)

    run()


def test_every_codec_of_a_held_family_has_a_strategy() -> None:
    missing = {type(c).__name__ for f in UNIFIED_HELD for c in FAMILIES[f].codecs} - {
        t.__name__ for t in STRATEGIES}
    assert not missing, f"codec types with no strategy in {Path(__file__).name}: {sorted(missing)}"
