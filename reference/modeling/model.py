"""The unified decoder: one skeleton, every dense family, chosen by the spec.

    x = embed(ids) * embedding_multiplier
    for each block:                                      # residual stream, (B, T, hidden)
        x = x + r * attn_post_norm(attn(attn_norm(x)))   # r: residual_multiplier; a norm the
        x = x + r * mlp_post_norm(mlp(mlp_norm(x)))      # spec lacks (pre_norms, post_norms)
                                                         # is the identity
        # parallel_block: x + attn(attn_norm(x)) + mlp(mlp_norm(x)), both off the block's input
        # x (shared_norm: mlp_norm is attn_norm; branches_first: x + (attn + mlp))
    logits = softcap(lm_head(norm(x)) * logit_scale / logits_divisor)

Norms are RMSNorm, or LayerNorm (`layernorm`), with a bias (`norm_bias`) or no parameters at
all (`norm_params`).

Attribute names are the canonical names of reference.families.spec (embed, layers.N.attn.q,
...), so a checkpoint in canonical names loads with no key map. Nothing here knows a family.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from reference.families.spec import ModelSpec
from reference.modeling import attention
from reference.modeling.config import UnifiedConfig
from reference.modeling.mla import LatentAttention
from reference.modeling.moe import MoE
from reference.modeling.probes import Probes
from reference.modeling.rope import Rotary, apply_rotary

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, times w (cast back first, as Llama) or times (1 + w) in fp32 (Gemma's
    offset form, cast back last)."""

    def __init__(self, shape: tuple[int, ...], eps: float, offset: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape) if offset else torch.ones(shape))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std over the last dim, times w plus b where the spec has them: torch's
    layer_norm, as nn.LayerNorm (StableLM, Phi, GPT-NeoX) and OLMo's parameter-free one compute
    it, or written out in fp32 (`moments`, Cohere's). A weight per head, (heads, head_dim),
    multiplies in fp32 after the norm (Cohere's q/k)."""

    def __init__(self, shape: tuple[int, ...], eps: float, params: bool, bias: bool,
                 moments: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape)) if params else None
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None
        self.eps, self.moments = eps, moments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.moments and (self.weight is None or self.weight.ndim == 1):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if self.moments:
            h = x.float()
            centred = h - h.mean(-1, keepdim=True)
            h = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            h = F.layer_norm(x.float(), x.shape[-1:], None, None, self.eps)  # (B, T, H, D)
        if self.weight is not None:
            h = self.weight.float() * h
        if self.bias is not None:
            h = h + self.bias.float()
        return h.to(x.dtype)


def _norm(spec: ModelSpec, *shape: int, bias: bool | None = None) -> nn.Module:
    """The spec's kind of norm over the last dim of `shape`; `bias` None is the spec's own."""
    if spec.layernorm:
        return LayerNorm(shape, spec.norm_eps, spec.norm_params, spec.norm_bias if bias is None else bias,
                         spec.norm_moments)
    return RMSNorm(shape, spec.norm_eps, spec.norm_offset)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d, h, kv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        self.q = nn.Linear(spec.hidden_size, h * d, bias=spec.qkv_bias)
        self.k = nn.Linear(spec.hidden_size, kv * d, bias=spec.qkv_bias)
        self.v = nn.Linear(spec.hidden_size, kv * d, bias=spec.qkv_bias)
        self.o = nn.Linear(h * d, spec.hidden_size, bias=spec.o_bias)
        # q/k norm, before rope: over head_dim on each head (one weight, or one per head), or
        # over all heads at once
        self.qk_norm = spec.qk_norm_scope if spec.qk_norm else None
        shapes = {"head": ((d,), (d,)), "each_head": ((h, d), (kv, d)), "all": ((h * d,), (kv * d,))}
        if self.qk_norm is not None:
            q_shape, k_shape = shapes[self.qk_norm]
            self.q_norm = _norm(spec, *q_shape, bias=spec.qk_norm_bias)
            self.k_norm = _norm(spec, *k_shape, bias=spec.qk_norm_bias)
        self.clip, self.clip_after_norm = spec.clip_qkv, spec.clip_after_qk_norm
        self.layer, self.head_dim = layer, d
        self.scale = spec.head_dim ** -0.5 if spec.attention_multiplier is None else spec.attention_multiplier
        self.softcap = spec.attn_softcap
        self.rotate, self.interleaved = not spec.alibi, spec.interleaved_rope  # ALiBi: no rope
        self.long_context = spec.long_context_scaling
        self.kernel = attention.Kernel()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: Cache | None, backend: str) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, H * D)
        if self.clip is not None and not self.clip_after_norm:
            q, k, v = (y.clamp(-self.clip, self.clip) for y in (q, k, v))
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)  # (B, T, H, D)
        if self.qk_norm in ("head", "each_head"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None and self.clip_after_norm:  # OLMoE: the normed q and k clamped
            q, k, v = (y.clamp(-self.clip, self.clip) for y in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if self.rotate:
            q, k = apply_rotary(q, *rope, self.interleaved), apply_rotary(k, *rope, self.interleaved)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # (B, KV, S, D), S = past + T
        if self.long_context is not None and not self.training:  # Qwen v1's log-n attention (eval only)
            q = q * attention.log_n(self.long_context, k.shape[2] - t, k.shape[2], q.device).to(q.dtype)
        out, _ = self.kernel(backend, q, k, v, mask, self.scale, self.softcap)  # (B, H, T, D)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), or without a gate down(act(up(x))) (GPT-NeoX's fc1 -> fc2)."""

    def __init__(self, spec: ModelSpec, size: int | None = None) -> None:
        super().__init__()
        size = spec.intermediate_size if size is None else size  # an expert's own size (moe.py)
        if spec.gated_mlp:
            self.gate = nn.Linear(spec.hidden_size, size, bias=spec.mlp_bias)
        self.up = nn.Linear(spec.hidden_size, size, bias=spec.mlp_bias)
        self.down = nn.Linear(size, spec.hidden_size, bias=spec.mlp_bias)
        self.act = ACT2FN[spec.hidden_act]
        self.gated = spec.gated_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(GradientCheckpointingLayer):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()

        def norm(on: bool) -> nn.Module:
            return _norm(spec, spec.hidden_size) if on else nn.Identity()

        self.attn_norm = norm(spec.pre_norms)
        if spec.latent_attention:  # MLA's latent norms are the model's RMSNorm, with their own eps
            self.attn = LatentAttention(spec, layer,
                                        lambda size, eps: _norm(spec.replace(norm_eps=eps), size))
        else:
            self.attn = Attention(spec, layer)
        self.attn_post_norm = norm(spec.post_norms)
        self.mlp_norm = norm(spec.pre_norms and not spec.shared_norm)
        sparse = spec.num_experts and (spec.moe is None or spec.moe.on(layer))
        self.mlp = MoE(spec, lambda size: MLP(spec, size)) if sparse else MLP(spec)
        self.mlp_post_norm = norm(spec.post_norms)
        self.residual = spec.residual_multiplier
        self.parallel, self.shared_norm = spec.parallel_block, spec.shared_norm
        self.branches_first = spec.branches_first

    def _add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + (out if self.residual == 1.0 else out * self.residual)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: Cache | None, backend: str) -> torch.Tensor:
        h = self.attn_norm(x)
        a = self.attn_post_norm(self.attn(h, rope, mask, cache, backend))
        if not self.parallel:
            x = self._add(x, a)
            return self._add(x, self.mlp_post_norm(self.mlp(self.mlp_norm(x))))
        # parallel: both branches read the block's input x (through one norm, or two)
        m = self.mlp_post_norm(self.mlp(h if self.shared_norm else self.mlp_norm(x)))
        if self.branches_first:
            return self._add(x, a + m)  # (attn + mlp) + x, rounded as Phi and GPT-NeoX do
        return self._add(self._add(x, a), m)


class UnifiedModel(PreTrainedModel):
    """The trunk every head shares: embedding, blocks and final norm, from the ModelSpec
    (`config.spec`); `set_device` spreads it over several devices."""

    config_class = UnifiedConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: UnifiedConfig) -> None:
        super().__init__(config)
        spec = self.spec = config.model_spec()
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = _norm(spec, spec.hidden_size)
        self.rotary = Rotary(config)
        self._said_fallback = False
        self._sequence_parallel = None  # reference.modeling.sequence_parallel, once enabled

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm):
            nn.init.zeros_(module.weight) if module.offset else nn.init.ones_(module.weight)
        if isinstance(module, LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def _backend(self) -> str:
        chosen = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if chosen not in attention.BACKENDS:  # transformers refuses it at construction; set later
            raise ValueError(f"attn_implementation {chosen!r} is not one of the unified model's backends "
                             f"({', '.join(attention.BACKENDS)})")
        if self.spec.attn_softcap is not None and chosen not in attention.SERVES_SOFTCAP:
            if not self._said_fallback:
                log.warning("%s attention cannot apply attn_softcap=%s: this model runs eager attention",
                            chosen, self.spec.attn_softcap)
                self._said_fallback = True
            return "eager"
        return chosen

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids.to(self.embed.weight.device))
        m = self.spec.embedding_multiplier
        # rounded to the model dtype first, as Gemma applies sqrt(hidden)
        return x if m == 1.0 else x * torch.tensor(m, dtype=x.dtype, device=x.device)

    def set_device(self, devices: str | torch.device | list[str | torch.device],
                   weights: list[float] | None = None) -> UnifiedModel:
        """Spread the blocks over `devices` in contiguous runs (reference.modeling.placement),
        the embedding on the first device and the final norm and head on the last; one device
        puts everything back on it. A tied head shares the embedding's weight, so it stays with
        the embedding on the first device. Activations, rope, masks and each block's KV cache
        follow the blocks in forward."""
        from reference.modeling.placement import plan

        listed = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
        listed = [torch.device(d) for d in listed]
        if len(listed) == 1:
            return self.to(listed[0])
        self.embed.to(listed[0])
        self.rotary.to(listed[0])
        for layer, index in zip(self.layers, plan(len(self.layers), len(listed), weights), strict=True):
            layer.to(listed[index])
        self.norm.to(listed[-1])
        for head in self._heads():
            head.to(listed[-1])
        return self

    def enable_sequence_parallel(self, group: Any = None, mode: str = "ulysses") -> UnifiedModel:
        """Split the sequence over the ranks of `group` (a torch.distributed group; None: the
        default one): each rank then passes its `torch.tensor_split` slice of the sequence (and
        of a padding attention_mask) and gets back that slice's outputs. `mode` "ulysses"
        (all-to-all to head shards) or "ring" (K/V passed round the ring, causal work balanced
        by a zigzag re-shard); reference.modeling.sequence_parallel."""
        from reference.modeling.sequence_parallel import enable

        enable(self, group, mode)
        return self

    def _heads(self) -> list[nn.Module]:
        """The modules after the final norm that own their weights (set_device puts them last)."""
        return []

    def trunk(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final norm's output (B, T, hidden), on the device of the last block."""
        x = self._embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden)
        b, t, _ = x.shape
        if attention_mask is not None:
            attention_mask = attention_mask.to(x.device)
        past = cache.get_seq_length() if cache is not None else 0
        padded = attention_mask is not None and not bool(attention_mask.all())
        sp = self._sequence_parallel
        if sp is None:
            query_pos = torch.arange(past, past + t, device=x.device)
            own, key_pos = query_pos, torch.arange(past + t, device=x.device)
        else:  # global positions: this slice's own, the queries its kernel sees, every key's
            if cache is not None:
                raise ValueError("sequence parallel does not combine with a KV cache")
            own, query_pos, key_pos = sp.positions(t, x.device)
            # the whole padding mask, gathered on every rank even when none is given (same collectives)
            mine = attention_mask if attention_mask is not None else torch.ones(b, t)
            attention_mask = sp.padding(mine.to(x.device, torch.long))  # one dtype on every rank
            padded = not bool(attention_mask.all())
        if position_ids is None:
            position_ids = own[None].expand(b, -1)
        position_ids = position_ids.to(x.device)
        backend = self._backend()

        def mask(window: int | None) -> torch.Tensor | None:
            """The additive mask of layers with this window (B or 1, 1 or H, T, S), rows the
            kernel's queries, columns every key; None is plain causal attention, which the kernels
            serve with no mask tensor at all (the ring builds each block's own from positions)."""
            if not (padded or self.spec.alibi or (window is not None and len(key_pos) > window)):
                return None
            m = attention.additive(attention.allowed(query_pos, key_pos, attention_mask, window), x.dtype)
            if self.spec.alibi:
                m = m + attention.alibi(self.spec.num_heads, query_pos, key_pos).to(x.dtype)
            return m

        windows = [self.spec.window_of(i) for i in range(len(self.layers))]
        masks = {w: mask(w) for w in set(windows)}
        lengths = None  # Qwen v1's dynamic NTK (eval only) scales rope by each row's length
        if self.spec.long_context_scaling is not None and not self.training:
            lengths = attention_mask.sum(-1) if attention_mask is not None else key_pos[-1:] + 1
        ropes = self.rotary(position_ids, x.dtype, lengths)  # [full layers', windowed layers']
        for layer, window in zip(self.layers, windows, strict=True):
            device = _device_of(layer, x.device)
            if device != x.device:  # a block boundary of set_device: everything a block reads moves
                x = x.to(device)
                ropes = [(cos.to(device), sin.to(device)) for cos, sin in ropes]
                masks = {w: None if m is None else m.to(device) for w, m in masks.items()}
            x = layer(x, ropes[window is not None], masks[window], cache, backend)
        return self.norm(x.to(_device_of(self.norm, x.device)))

    @classmethod
    def from_pretrained(cls, path: str | Path, *args: Any, dtype: Any = None, torch_dtype: Any = None,
                        attn_implementation: str | None = None, **kwargs: Any) -> Any:
        """Load a unified directory, or any supported family's directory as it is
        (reference.modeling.load): built on the meta device, tensors assigned, no random init.
        `dtype` casts floating tensors ("auto" or None keeps each as stored)."""
        from reference.modeling.load import load

        for unsupported in ("device_map", "quantization_config"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"{cls.__name__}.from_pretrained: {unsupported} is not supported")
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        return load(path, dtype, attn_implementation, cls)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module's parameters live (a parameter-free norm runs where its input is)."""
    p = next(module.parameters(), None)
    return default if p is None else p.device


class UnifiedForCausalLM(Probes, UnifiedModel, GenerationMixin):
    """A causal LM of any dense family, from its ModelSpec (`config.spec`)."""

    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: UnifiedConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(self.spec.hidden_size, self.spec.vocab_size, bias=self.spec.lm_head_bias)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _heads(self) -> list[nn.Module]:
        return [] if self.spec.tie_word_embeddings else [self.lm_head]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight
        x = x.to(w.device)
        logits = F.linear(x, F.normalize(w, dim=-1) if self.spec.normalized_head else w, self.lm_head.bias)
        if self.spec.logit_scale != 1.0:
            logits = logits * self.spec.logit_scale
        if self.spec.logits_divisor != 1.0:
            logits = logits / self.spec.logits_divisor
        return attention.tanh_softcap(logits, self.spec.final_softcap)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if self._sequence_parallel is not None and labels is not None:  # the shift crosses slices
            raise ValueError("sequence parallel does not combine with labels: compute the loss from the "
                             "returned logits with labels shifted over the whole sequence")
        if cache is None and use_cache:
            cache = DynamicCache()
        x = self.trunk(input_ids, attention_mask, position_ids, cache, inputs_embeds)  # (B, T, hidden)
        logits = self._head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.spec.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def stream_generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any):  # noqa: ANN201
        """A plain generator of new tokens (or text, given a tokenizer), step by step:
        reference.modeling.generate.stream_generate."""
        from reference.modeling.generate import stream_generate

        return stream_generate(self, input_ids, **kwargs)
