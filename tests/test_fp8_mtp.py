"""DeepSeek-V3 as published (issue 14): FP8 block-scaled weights with their `_scale_inv`
siblings, and a multi-token-prediction layer after the decoder's own. A tiny deepseek_v3 is
written in that layout here (quantized by this file, not by the code it checks); reading it
dequantizes as transformers does, bitwise, and the MTP layer is refused by name unless
`--allow-drop mtp`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from harness import assert_bitwise, fails, read_tensors

from reference.cli import main
from reference.modeling import UnifiedForCausalLM
from reference.tiny import golden_input, logits, save_tiny

# The linear projections DeepSeek quantizes; embeddings, norms, the router and lm_head stay dense.
QUANTIZED = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj", "eh_proj")
E4M3_MAX = 448.0


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict]:
    """The tiny deepseek_v3's tensors and config as transformers saves them (2 layers), with
    DeepSeek-V3's norm eps (which megatron-core's latent norms share)."""
    path = save_tiny("deepseek_v3", tmp_path_factory.mktemp("dense") / "m", rms_norm_eps=1e-6)
    return read_tensors(path), json.loads((path / "config.json").read_text())


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and float32 scale_inv per block, the last block cut short: the
    weight padded to whole blocks, each block's absolute max mapped to e4m3's largest value."""
    rows, cols = w.shape
    grid = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale_inv = blocks.abs().amax(dim=(1, 3)) / E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv


def mtp_layer(dense: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Layer n as DeepSeek-V3 publishes its MTP module: a decoder layer (here a copy of the last
    one) plus enorm, hnorm, eh_proj, shared_head and its own embed_tokens."""
    last = f"model.layers.{n - 1}."
    out = {f"model.layers.{n}." + k.removeprefix(last): v for k, v in dense.items() if k.startswith(last)}
    hidden = dense["model.norm.weight"].shape[0]
    g = torch.Generator().manual_seed(n)
    out.update({f"model.layers.{n}.enorm.weight": torch.ones(hidden),
                f"model.layers.{n}.hnorm.weight": torch.ones(hidden),
                f"model.layers.{n}.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g) / hidden,
                f"model.layers.{n}.shared_head.norm.weight": torch.ones(hidden),
                f"model.layers.{n}.shared_head.head.weight": dense["lm_head.weight"],
                f"model.layers.{n}.embed_tokens.weight": dense["model.embed_tokens.weight"]})
    return out


def publish(dense: tuple[dict[str, torch.Tensor], dict], out: Path, block: tuple[int, int],
            damage=None) -> Path:
    """The published layout: projections in fp8 + `_scale_inv`, the rest bf16 (the routing
    bias fp32), two shards and an index, the MTP layer in the last shard, `torch_dtype` and
    `quantization_config` in config.json. `damage` edits the tensors before they are written."""
    tensors, config = dense
    layers = config["num_hidden_layers"]
    written: dict[str, torch.Tensor] = {}
    for key, w in {**tensors, **mtp_layer(tensors, layers)}.items():
        if key.endswith(".weight") and key.split(".")[-2] in QUANTIZED:
            written[key], written[key + "_scale_inv"] = quantize(w, block)
        else:
            written[key] = w if "e_score_correction_bias" in key else w.to(torch.bfloat16)
    if damage is not None:
        damage(written)
    out.mkdir()
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in written.items():
        name = f"model-0000{1 + key.startswith(f'model.layers.{layers}.')}-of-00002.safetensors"
        shards.setdefault(name, {})[key] = w.contiguous()
    for name, part in shards.items():
        safetensors.torch.save_file(part, out / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {k: v for k, v in config.items() if k != "dtype"}
    config.update(torch_dtype="bfloat16", num_nextn_predict_layers=1,
                  quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": list(block)})
    (out / "config.json").write_text(json.dumps(config))
    return out


def transformers_model(path: Path, dtype=None):
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                experts_implementation="eager", **kwargs).eval()


def test_fp8_reads_as_transformers_dequantizes_and_mtp_drops_on_request(dense, tmp_path, capsys) -> None:
    """Blocks of 8 divide every tiny shape, where transformers' own dequantize path is defined:
    its state dict and ours agree bitwise in bf16, and the logits in fp32."""
    fp8 = publish(dense, tmp_path / "fp8", (8, 8))
    assert main(["convert", str(fp8), str(tmp_path / "bf16"), "--to", "hf", "--allow-drop", "mtp"]) == 0
    out = capsys.readouterr().out
    count = sum(k.endswith("_scale_inv") and not k.startswith("model.layers.2.") for k in read_tensors(fp8))
    line = f"dequantized {count} fp8 tensors (block 8x8) to bfloat16"
    assert count == 28 and line in out, out
    assert "caveat: dropped mtp" in out and "'model.layers.2.*'" in out, out
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_nextn_predict_layers"] == 0
    record = json.loads((tmp_path / "bf16" / "conversion.json").read_text())
    assert record["read_as"] == [line]
    assert any(c.startswith("dropped mtp") for c in record["caveats"])
    assert not any(k.startswith("model.layers.2.") or k.endswith("_scale_inv")
                   for k in read_tensors(tmp_path / "bf16"))

    theirs = transformers_model(fp8)  # on a CPU, transformers dequantizes into the config's dtype
    assert theirs.dtype == torch.bfloat16 and getattr(theirs.config, "quantization_config", None) is None
    ours = transformers_model(tmp_path / "bf16", torch.bfloat16)
    assert_bitwise(theirs.state_dict(), ours.state_dict())
    assert ours.config.num_mtp_layers == 0
    ids = golden_input()
    torch.testing.assert_close(logits(transformers_model(tmp_path / "bf16", torch.float32), ids),
                               logits(theirs.float(), ids))

    # Asked for float32, both dequantize straight into it: one rounding, not two.
    theirs = transformers_model(fp8, torch.float32)
    assert main(["convert", str(fp8), str(tmp_path / "fp32"), "--to", "hf", "--allow-drop", "mtp",
                 "--dtype", "float32"]) == 0
    assert "fp8 tensors (block 8x8) to float32" in capsys.readouterr().out
    assert_bitwise(theirs.state_dict(), transformers_model(tmp_path / "fp32", torch.float32).state_dict())
    unified = UnifiedForCausalLM.from_pretrained(fp8, dtype=torch.float32)  # the same reader
    torch.testing.assert_close(logits(unified, ids), logits(theirs, ids))

    args = ["--allow-drop", "mtp", "--tp", "2", "--ep", "2"]
    assert main(["convert", str(fp8), str(tmp_path / "mg"), "--to", "megatron", *args]) == 0
    assert main(["convert", str(tmp_path / "mg"), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert_bitwise(read_tensors(tmp_path / "bf16"), read_tensors(tmp_path / "back"))


def test_cut_short_blocks_dequantize_as_transformers_fp8_linear(dense, tmp_path, capsys) -> None:
    """Blocks of 16 leave a cut-short last block in most tiny shapes (72, 24, 112 ...): each
    written weight is bitwise transformers' FP8Linear dequantization (by weight_block_size) in
    fp32, rounded to bf16."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    fp8 = publish(dense, tmp_path / "fp8", (16, 16))
    assert main(["convert", str(fp8), str(tmp_path / "bf16"), "--to", "hf", "--allow-drop", "mtp"]) == 0
    stored, got = read_tensors(fp8), read_tensors(tmp_path / "bf16")
    scaled = [k.removesuffix("_scale_inv") for k in stored if k.endswith("_scale_inv")
              and not k.startswith("model.layers.2.")]
    assert any(stored[k].shape[0] % 16 for k in scaled) and any(stored[k].shape[1] % 16 for k in scaled)
    for key in scaled:
        want = _dequantize_fp8_weight(stored[key], stored[key + "_scale_inv"], [16, 16], torch.float32)
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want.to(torch.bfloat16)), key


KEY = "model.layers.1.self_attn.kv_b_proj.weight"
DAMAGE = {
    "scale missing": (lambda t: t.pop(KEY + "_scale_inv"), (f"'{KEY}'", "no '")),
    "scale of the wrong shape": (lambda t: t.update({KEY + "_scale_inv": t[KEY + "_scale_inv"][:-1]}),
                                 (f"'{KEY}_scale_inv'", "shape")),
    "scale without its weight": (lambda t: t.pop(KEY), (f"'{KEY}_scale_inv'", "missing")),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_bad_scales_name_the_tensor(case: str, dense, tmp_path, capsys) -> None:
    damage, needles = DAMAGE[case]
    fp8 = publish(dense, tmp_path / "fp8", (16, 16), damage)
    args = ["convert", str(fp8), str(tmp_path / "dst"), "--to", "hf", "--allow-drop", "mtp"]
    fails(capsys, args, *needles)
    assert not (tmp_path / "dst").exists()


def test_mtp_refused_by_name_without_allow_drop(dense, tmp_path, capsys) -> None:
    fp8 = publish(dense, tmp_path / "fp8", (16, 16))
    for to in ("hf", "megatron"):
        fails(capsys, ["convert", str(fp8), str(tmp_path / "dst"), "--to", to],
               "multi-token-prediction", "'model.layers.2.*'", "--allow-drop mtp")
        assert not (tmp_path / "dst").exists()


# DeepSeek-V3's published config.json (the fields that shape its tensors and features).
V3 = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
      "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
      "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
      "routed_scaling_factor": 2.5,
      "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
      "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
      "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
      "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
      "rms_norm_eps": 1e-6,
      "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
      "tie_word_embeddings": False, "torch_dtype": "bfloat16", "num_nextn_predict_layers": 1,
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]}}


def published_v3() -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """DeepSeek-V3's published tensors: name -> (dtype, shape), layer 61 its MTP module."""
    h, v = V3["hidden_size"], V3["vocab_size"]
    heads, experts = V3["num_attention_heads"], V3["n_routed_experts"]
    bf16, f32, fp8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn
    out = {"model.embed_tokens.weight": (bf16, (v, h)), "model.norm.weight": (bf16, (h,)),
           "lm_head.weight": (bf16, (v, h))}

    def linear(name: str, rows: int, cols: int) -> None:
        out[name] = (fp8, (rows, cols))
        out[name + "_scale_inv"] = (f32, (math.ceil(rows / 128), math.ceil(cols / 128)))

    def mlp(prefix: str, size: int) -> None:
        for p in ("gate", "up"):
            linear(f"{prefix}.{p}_proj.weight", size, h)
        linear(f"{prefix}.down_proj.weight", h, size)

    for i in range(V3["num_hidden_layers"] + 1):
        p = f"model.layers.{i}"
        out.update({f"{p}.input_layernorm.weight": (bf16, (h,)),
                    f"{p}.post_attention_layernorm.weight": (bf16, (h,)),
                    f"{p}.self_attn.q_a_layernorm.weight": (bf16, (1536,)),
                    f"{p}.self_attn.kv_a_layernorm.weight": (bf16, (512,))})
        linear(f"{p}.self_attn.q_a_proj.weight", 1536, h)
        linear(f"{p}.self_attn.q_b_proj.weight", heads * 192, 1536)
        linear(f"{p}.self_attn.kv_a_proj_with_mqa.weight", 576, h)  # 4.5 blocks of rows
        linear(f"{p}.self_attn.kv_b_proj.weight", heads * 256, 512)
        linear(f"{p}.self_attn.o_proj.weight", h, heads * 128)
        if i < V3["first_k_dense_replace"]:
            mlp(f"{p}.mlp", V3["intermediate_size"])
            continue
        out.update({f"{p}.mlp.gate.weight": (bf16, (experts, h)),
                    f"{p}.mlp.gate.e_score_correction_bias": (f32, (experts,))})
        for e in range(experts):
            mlp(f"{p}.mlp.experts.{e}", 2048)
        mlp(f"{p}.mlp.shared_experts", 2048)
    p = f"model.layers.{V3['num_hidden_layers']}"
    out.update({f"{p}.enorm.weight": (bf16, (h,)), f"{p}.hnorm.weight": (bf16, (h,)),
                f"{p}.shared_head.norm.weight": (bf16, (h,)), f"{p}.shared_head.head.weight": (bf16, (v, h)),
                f"{p}.embed_tokens.weight": (bf16, (v, h))})
    linear(f"{p}.eh_proj.weight", h, 2 * h)
    return out


def test_published_v3_every_key_placed_at_real_size() -> None:
    """Real sizes without real weights: every published tensor is read once (the MTP layer kept
    apart), every scale grid fits, kv_a_proj_with_mqa's cut-short block included."""
    from reference.converters.fp8 import Dequantized, dequantized, read_fp8
    from reference.converters.plan import read_canonical
    from reference.converters.safetensors_io import Entry
    from reference.converters.unheld import split_unheld
    from reference.families.registry import FAMILIES
    from reference.families.resolve import as_loaded

    family = FAMILIES["deepseek_v3"]
    spec = family.read(as_loaded(V3, "V3"), "V3")
    entries = {k: Entry(Path("V3"), 0, 0, dtype, shape) for k, (dtype, shape) in published_v3().items()}
    unheld = split_unheld(entries, V3, spec.num_layers)
    assert len(unheld["mtp"]) == sum(k.startswith("model.layers.61.") for k in entries)
    kept = {k: e for k, e in entries.items() if k not in set(unheld["mtp"])}
    read = dequantized(kept, read_fp8(V3, "V3"), "V3")
    fp8 = [e for e in read.values() if isinstance(e, Dequantized)]
    assert len(fp8) == sum(k.endswith("_scale_inv") for k in kept)
    assert all(e.meta().dtype == torch.bfloat16 for e in fp8)
    assert read["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].scale.shape == (5, 56)
    tensors = read_canonical(read, family, spec, "V3")  # raises on any key left over or missing
    assert tensors["layers.3.attn.kv_a.weight"].meta.dtype == torch.bfloat16
