"""Checkpoint layouts with no class in transformers (Baichuan2-7B, InternLM2, Qwen v1, ChatGLM2/3
and GLM-4's remote code): tiny
random checkpoints written key by key from the published layouts, and a reference forward
written from the published modeling code. It reads the fused tensors the way those files do
(W_pack unflattened into thirds, wqkv regrouped per KV head, c_attn split in thirds,
query_key_value split into all queries, then keys, then values), so it
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
GLM_D, GLM_RATIO = 16, 2.5  # ChatGLM: kv_channels != hidden / heads; rope base 10000 * rope_ratio

# The lines of the published ChatGLM3 / GLM-4 modeling_chatglm.py that say what rope_ratio
# means (ChatGLM2-32k's divide the positions instead: `seq_idx = ... / self.rope_ratio`),
# written beside the tiny checkpoint as the published one is; read as text, never run.
CHATGLM_ROPE_CODE = """class RotaryEmbedding(nn.Module):
    def forward_impl(self, seq_len: int, n_elem: int, dtype, device, base: int = 10000):
        base = base * self.rope_ratio
        theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float, device=device) / n_elem))
        seq_idx = torch.arange(seq_len, dtype=torch.float, device=device)
"""
CHATGLM_POSITIONS_CODE = CHATGLM_ROPE_CODE.replace("        base = base * self.rope_ratio\n", "").replace(
    "device=device)\n", "device=device) / self.rope_ratio\n")

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
    "chatglm": {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "padded_vocab_size": V,
                "hidden_size": H, "ffn_hidden_size": FF, "num_layers": L, "num_attention_heads": HEADS,
                "kv_channels": GLM_D, "multi_query_attention": True, "multi_query_group_num": KV,
                "seq_length": 64, "layernorm_epsilon": EPS, "rmsnorm": True, "add_qkv_bias": True,
                "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
                "apply_residual_connection_post_layernorm": False, "rope_ratio": GLM_RATIO,
                "torch_dtype": "float32", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0},
}
# The transformers family each layout converts to exactly (the test's oracle for its key map).
HF_FAMILY = {"baichuan": "llama", "internlm2": "llama", "qwen": "llama", "chatglm": "glm"}
# Remote code beside each tiny checkpoint, as the published repositories have it.
CODE = {"chatglm": {"modeling_chatglm.py": CHATGLM_ROPE_CODE,
                    "tokenization_chatglm.py": "class ChatGLMTokenizer:  # stands in for the remote file\n"}}


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
        elif model_type == "chatglm":
            p, qkv = f"transformer.encoder.layers.{i}.", (HEADS + 2 * KV) * GLM_D
            out |= {p + "input_layernorm.weight": (H,), p + "self_attention.query_key_value.weight": (qkv, H),
                    p + "self_attention.query_key_value.bias": (qkv,),
                    p + "self_attention.dense.weight": (H, HEADS * GLM_D),
                    p + "post_attention_layernorm.weight": (H,), p + "mlp.dense_h_to_4h.weight": (2 * FF, H),
                    p + "mlp.dense_4h_to_h.weight": (H, FF)}
        else:
            p = f"transformer.h.{i}."
            out |= {p + "attn.c_attn.weight": (3 * H, H), p + "attn.c_attn.bias": (3 * H,),
                    p + "attn.c_proj.weight": (H, H), p + "mlp.w1.weight": (FF, H),
                    p + "mlp.w2.weight": (FF, H), p + "mlp.c_proj.weight": (H, FF),
                    p + "ln_1.weight": (H,), p + "ln_2.weight": (H,)}
    if model_type == "chatglm":
        out |= {"transformer.embedding.word_embeddings.weight": (V, H),
                "transformer.encoder.final_layernorm.weight": (H,), "transformer.output_layer.weight": (V, H)}
    elif model_type == "qwen":
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
    if model_type == "chatglm":  # the persistent buffer of RotaryEmbedding(kv_channels // 2)
        dim = GLM_D // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        tensors["transformer.rotary_pos_emb.inv_freq"] = inv_freq
    path.mkdir(parents=True)
    safetensors.torch.save_file(tensors, path / "model.safetensors", {"format": "pt"})
    (path / "config.json").write_text(json.dumps(CONFIGS[model_type], indent=2))
    for name, text in CODE.get(model_type, {}).items():
        (path / name).write_text(text)
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


def _chatglm_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """ChatGLM's apply_rotary_pos_emb: x (b, s, heads, d); cache (s, rot_dim / 2, 2) of cos, sin.
    The first rot_dim dims of each head turn as (even, odd) pairs, the rest pass through."""
    rot_dim = cache.shape[-2] * 2
    x, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    xs = x.reshape(*x.shape[:-1], rot_dim // 2, 2)
    c = cache[None, :, None]  # (1, s, 1, rot_dim / 2, 2)
    out = torch.stack([xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1],
                       xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1]], -1)
    return torch.cat((out.flatten(-2), x_pass), dim=-1)


def _chatglm_forward(w: dict[str, torch.Tensor], cfg: dict, code: str, ids: torch.Tensor) -> torch.Tensor:
    """ChatGLM2/3 and GLM-4's ChatGLMModel: RMSNorm, fused query_key_value (all queries, then the
    key groups, then the value groups), rope on half of each head, fused SwiGLU."""
    heads, d = cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    b, s = ids.shape
    n_elem, ratio = d // 2, cfg.get("rope_ratio", 1)  # RotaryEmbedding(rotary_dim // 2)
    base = THETA * ratio if "base = base * self.rope_ratio" in code else THETA
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    seq_idx = torch.arange(s, dtype=torch.float)
    if "/ self.rope_ratio" in code:  # ChatGLM2-32k
        seq_idx = seq_idx / ratio
    idx_theta = torch.outer(seq_idx, theta).float()
    cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
    mask = torch.full((s, s), float("-inf")).triu(1)
    h = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"])
        mixed = x @ w[p + "self_attention.query_key_value.weight"].T
        if cfg["add_qkv_bias"] or cfg["add_bias_linear"]:
            mixed = mixed + w[p + "self_attention.query_key_value.bias"]
        q, k, v = mixed.split([heads * d, groups * d, groups * d], dim=-1)
        q, k = _chatglm_rope(q.view(b, s, heads, d), cache), _chatglm_rope(k.view(b, s, groups, d), cache)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, s, groups, d).transpose(1, 2)
        k = k.repeat_interleave(heads // groups, 1)  # key_layer.unsqueeze(2).expand(...): per group
        v = v.repeat_interleave(heads // groups, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + mask, dim=-1, dtype=torch.float32)
        h = h + (att @ v).transpose(1, 2).reshape(b, s, -1) @ w[p + "self_attention.dense.weight"].T
        x = _rms(h, w[p + "post_attention_layernorm.weight"])
        gate, up = (x @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)  # swiglu
        h = h + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    return _rms(h, w["transformer.encoder.final_layernorm.weight"]) @ w["transformer.output_layer.weight"].T


@torch.no_grad()
def forward(model_type: str, path: Path, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a layout checkpoint, computed as its published modeling code does."""
    w: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        w.update(safetensors.torch.load_file(shard))
    cfg = json.loads((path / "config.json").read_text())
    if model_type == "chatglm":
        code = path / "modeling_chatglm.py"
        return _chatglm_forward(w, cfg, code.read_text() if code.is_file() else "", ids)
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
