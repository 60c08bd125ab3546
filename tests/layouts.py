"""Checkpoint layouts with no class in transformers (Baichuan2-7B, InternLM2, Qwen v1): tiny
random checkpoints written key by key from the published layouts, and a reference forward
written from the published modeling code. It reads the fused tensors the way those files do
(W_pack unflattened into thirds, wqkv regrouped per KV head, c_attn split in thirds), so it
shares nothing with the converter it checks. The same forward follows the config where the
published code does: Baichuan-13B's ALiBi (a config without max_position_embeddings) and
Qwen's dynamic NTK and log-n attention (`use_dynamic_ntk`, `use_logn_attn`)."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

from reference.tiny import SHAPE

H, L, V, FF = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["vocab_size"], 112
HEADS, KV, D = 6, 2, 12  # these layouts use head_dim = hidden / heads
EPS, THETA = 1e-5, 10000.0

CONFIGS = {
    "baichuan": {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "vocab_size": V,
                 "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L,
                 "num_attention_heads": HEADS, "max_position_embeddings": 64, "rms_norm_eps": EPS,
                 "hidden_act": "silu", "tie_word_embeddings": False},
    "internlm2": {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "vocab_size": V,
                  "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L,
                  "num_attention_heads": HEADS, "num_key_value_heads": KV, "max_position_embeddings": 64,
                  "rms_norm_eps": EPS, "rope_theta": THETA, "rope_scaling": None, "bias": False,
                  "hidden_act": "silu", "tie_word_embeddings": False},
    "qwen": {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "vocab_size": V,
             "hidden_size": H, "intermediate_size": 2 * FF, "num_hidden_layers": L,
             "num_attention_heads": HEADS, "kv_channels": D, "max_position_embeddings": 64,
             "seq_length": 64, "layer_norm_epsilon": EPS, "rotary_emb_base": THETA, "rotary_pct": 1.0,
             "use_dynamic_ntk": False, "use_logn_attn": False, "no_bias": True,
             "tie_word_embeddings": False},
}


def shapes(model_type: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the layout, from the published modeling code."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(L):
        if model_type == "baichuan":
            p = f"model.layers.{i}."
            out |= {p + "self_attn.W_pack.weight": (3 * H, H), p + "self_attn.o_proj.weight": (H, H),
                    p + "mlp.gate_proj.weight": (FF, H), p + "mlp.up_proj.weight": (FF, H),
                    p + "mlp.down_proj.weight": (H, FF), p + "input_layernorm.weight": (H,),
                    p + "post_attention_layernorm.weight": (H,)}
        elif model_type == "internlm2":
            p = f"model.layers.{i}."
            out |= {p + "attention.wqkv.weight": ((HEADS + 2 * KV) * D, H),
                    p + "attention.wo.weight": (H, HEADS * D), p + "feed_forward.w1.weight": (FF, H),
                    p + "feed_forward.w3.weight": (FF, H), p + "feed_forward.w2.weight": (H, FF),
                    p + "attention_norm.weight": (H,), p + "ffn_norm.weight": (H,)}
        else:
            p = f"transformer.h.{i}."
            out |= {p + "attn.c_attn.weight": (3 * H, H), p + "attn.c_attn.bias": (3 * H,),
                    p + "attn.c_proj.weight": (H, H), p + "mlp.w1.weight": (FF, H),
                    p + "mlp.w2.weight": (FF, H), p + "mlp.c_proj.weight": (H, FF),
                    p + "ln_1.weight": (H,), p + "ln_2.weight": (H,)}
    if model_type == "qwen":
        out |= {"transformer.wte.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    elif model_type == "internlm2":
        out |= {"model.tok_embeddings.weight": (V, H), "model.norm.weight": (H,), "output.weight": (V, H)}
    else:
        out |= {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    return out


def tiny_layout(model_type: str, path: Path, seed: int = 0) -> Path:
    """A tiny checkpoint of the layout, filled from (seed, name) like reference.tiny.fill."""
    tensors = {}
    for name, shape in shapes(model_type).items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        x = torch.randn(shape, generator=g)
        norm = len(shape) == 1 and ("norm" in name or ".ln_" in name)
        small = len(shape) == 1 or "emb" in name or "wte" in name
        tensors[name] = 1.0 + 0.5 * x if norm else 0.5 * x if small else x * shape[-1] ** -0.5
    path.mkdir(parents=True)
    safetensors.torch.save_file(tensors, path / "model.safetensors", {"format": "pt"})
    (path / "config.json").write_text(json.dumps(CONFIGS[model_type], indent=2))
    return path


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _rope(x: torch.Tensor, base: float = THETA) -> torch.Tensor:  # x: (b, s, heads, d), rotate-half style
    s, d = x.shape[1], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), -1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()


def _qkv(model_type: str, w: dict, p: str, x: torch.Tensor):
    b, s, _ = x.shape
    if model_type == "baichuan":  # proj.unflatten(-1, (3, hidden_size))
        q, k, v = (x @ w[p + "self_attn.W_pack.weight"].T).unflatten(-1, (3, H)).unbind(-2)
        return q.view(b, s, HEADS, D), k.view(b, s, HEADS, D), v.view(b, s, HEADS, D)
    if model_type == "internlm2":  # "b q (h gs d) -> b q h gs d", gs = 2 + groups
        qkv = (x @ w[p + "attention.wqkv.weight"].T).view(b, s, KV, HEADS // KV + 2, D)
        return qkv[..., :-2, :].reshape(b, s, HEADS, D), qkv[..., -2, :], qkv[..., -1, :]
    mixed = x @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
    q, k, v = mixed.split(H, dim=-1)
    return q.view(b, s, HEADS, D), k.view(b, s, HEADS, D), v.view(b, s, HEADS, D)


def _names(model_type: str, i: int) -> dict[str, str]:
    if model_type == "baichuan":
        p = f"model.layers.{i}."
        return {"n1": p + "input_layernorm.weight", "n2": p + "post_attention_layernorm.weight",
                "o": p + "self_attn.o_proj.weight", "gate": p + "mlp.gate_proj.weight",
                "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight", "p": p}
    if model_type == "internlm2":
        p = f"model.layers.{i}."
        return {"n1": p + "attention_norm.weight", "n2": p + "ffn_norm.weight",
                "o": p + "attention.wo.weight", "gate": p + "feed_forward.w1.weight",
                "up": p + "feed_forward.w3.weight",
                "down": p + "feed_forward.w2.weight", "p": p}
    p = f"transformer.h.{i}."
    return {"n1": p + "ln_1.weight", "n2": p + "ln_2.weight", "o": p + "attn.c_proj.weight",
            "gate": p + "mlp.w2.weight", "up": p + "mlp.w1.weight", "down": p + "mlp.c_proj.weight", "p": p}


def _alibi_mask(heads: int, s: int) -> torch.Tensor:
    """(heads, s, s): Baichuan-13B's mask in eval mode, slope * key position on and below the
    diagonal, -inf above. Slopes 2 ** (-8 k / n), k = 1..n, for n a power of two; otherwise the
    nearest lower power's, then the odd-numbered ones of the next power's (2 ** (-4 (2j + 1) / n'))."""
    low = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * k / low) for k in range(1, low + 1)]
    slopes += [2 ** (-4 * (2 * j + 1) / low) for j in range(heads - low)]
    bias = torch.tensor(slopes)[:, None, None] * torch.arange(s)[None, None, :]
    return torch.full((s, s), float("-inf")).triu(1)[None] + bias


def _ntk_base(s: int, seq_length: int) -> float:
    """Qwen's dynamic NTK: the rope base for a sequence of s tokens."""
    alpha = max(2 ** math.ceil(math.log2(s / seq_length) + 1) - 1, 1)
    return THETA * alpha ** (D / (D - 2))


def _logn(s: int, seq_length: int) -> torch.Tensor:
    """(1, s, 1, 1): Qwen's log-n factor of each query position, log_{seq_length}(p + 1) beyond it."""
    p = torch.arange(1, s + 1, dtype=torch.float64)
    scale = torch.where(p > seq_length, torch.log(p) / math.log(seq_length), torch.ones_like(p))
    return scale.float()[None, :, None, None]


@torch.no_grad()
def forward(model_type: str, path: Path, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a layout checkpoint, computed as its published modeling code does."""
    w: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        w.update(safetensors.torch.load_file(shard))
    cfg = json.loads((path / "config.json").read_text())
    top = {"baichuan": ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"),
           "internlm2": ("model.tok_embeddings.weight", "model.norm.weight", "output.weight"),
           "qwen": ("transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight")}[model_type]
    h = w[top[0]][ids]
    s = ids.shape[1]
    mask = torch.full((s, s), float("-inf")).triu(1)
    alibi = model_type == "baichuan" and "max_position_embeddings" not in cfg  # the 13B modeling file
    if alibi:
        mask = _alibi_mask(HEADS, s)
    base, seq_length = THETA, cfg.get("seq_length")
    if model_type == "qwen" and cfg.get("use_dynamic_ntk"):
        base = _ntk_base(s, seq_length)
    for i in range(L):
        n = _names(model_type, i)
        q, k, v = _qkv(model_type, w, n["p"], _rms(h, w[n["n1"]]))
        if not alibi:
            q, k = _rope(q, base), _rope(k, base)
        if model_type == "qwen" and cfg.get("use_logn_attn"):
            q = q * _logn(s, seq_length)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)  # each KV head serves its group
        v = v.transpose(1, 2)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / D**0.5 + mask, dim=-1, dtype=torch.float32)
        h = h + (att @ v).transpose(1, 2).reshape(*h.shape[:2], -1) @ w[n["o"]].T
        x = _rms(h, w[n["n2"]])
        h = h + (F.silu(x @ w[n["gate"]].T) * (x @ w[n["up"]].T)) @ w[n["down"]].T
    head = w[top[2]]
    if model_type == "baichuan":  # NormHead: rows normalised before use
        head = F.normalize(head, dim=-1)
    return _rms(h, w[top[1]]) @ head.T
