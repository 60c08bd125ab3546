"""Remote-code checkpoint layouts (Baichuan2-7B, InternLM2, Qwen v1, ChatGLM2/3 and GLM-4) against
a reference forward written from their published modeling code (tests/layouts.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from harness import assert_bitwise, check_golden, read_tensors
from layouts import CHATGLM_POSITIONS_CODE, CONFIGS, HF_FAMILY, forward, tiny_layout
from transformers import AutoModelForCausalLM

from reference.converters import convert
from reference.errors import Inexpressible, InputError
from reference.tiny import golden_input, logits


def test_every_layout_has_an_hf_family() -> None:
    assert set(HF_FAMILY) == set(CONFIGS)


@pytest.mark.parametrize("layout", list(CONFIGS))
def test_layout_to_its_hf_family_and_back(layout: str, tmp_path) -> None:
    src = tiny_layout(layout, tmp_path / "src")
    want = forward(layout, src, golden_input())
    check_golden(layout, False, want)

    there = convert(src, tmp_path / "hf", to=HF_FAMILY[layout])
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(model), want)

    back = convert(tmp_path / "hf", tmp_path / "back", to=layout)
    config = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "back")]
    assert config[0] == config[1]  # the conversion record carries the first config back
    torch.testing.assert_close(forward(layout, tmp_path / "back", golden_input()), want)
    if not (there.folds or back.folds):
        assert_bitwise(read_tensors(src), read_tensors(tmp_path / "back"))
    else:  # NormHead is one-way: only the head changed, everything else is bitwise
        assert [f.split(":")[0] for f in there.folds] == ["normalized_head"]
        a, b = read_tensors(src), read_tensors(tmp_path / "back")
        assert_bitwise({k: v for k, v in a.items() if k != "lm_head.weight"},
                       {k: v for k, v in b.items() if k != "lm_head.weight"})


def test_baichuan_13b_alibi_is_refused(tmp_path) -> None:
    src = tiny_layout("baichuan", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["max_position_embeddings"]  # as in the published 13B configs, which use ALiBi
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Inexpressible, match="'alibi'"):
        convert(src, tmp_path / "dst", to="llama")
    assert not (tmp_path / "dst").exists()


def test_qwen_long_context_scaling_is_refused_unless_allowed(tmp_path) -> None:
    src = tiny_layout("qwen", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "use_dynamic_ntk": True, "use_logn_attn": True}))
    with pytest.raises(Inexpressible, match="long_context_scaling"):
        convert(src, tmp_path / "dst", to="llama")
    report = convert(src, tmp_path / "dst", to="llama", allow=["long_context_scaling"])
    assert "long_context_scaling=64" in report.caveats[0]
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="eager")
    torch.testing.assert_close(logits(llama), forward("qwen", src, golden_input()))  # 12 <= 64 tokens


def test_llama_head_must_be_unit_length_for_baichuan(tmp_path) -> None:
    src = tiny_layout("internlm2", tmp_path / "src")
    convert(src, tmp_path / "llama", to="llama")
    with pytest.raises(Exception, match="unit length"):
        convert(tmp_path / "llama", tmp_path / "dst", to="baichuan")
    assert not (tmp_path / "dst").exists()


def _chatglm_with(path, code: str | None = None, **changes) -> object:
    """The tiny chatglm layout with config.json `changes` (None removes a field) and its
    modeling file replaced by `code` ("" removes it)."""
    src = tiny_layout("chatglm", path)
    cfg = {**json.loads((src / "config.json").read_text()), **changes}
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    if code == "":
        (src / "modeling_chatglm.py").unlink()
    elif code is not None:
        (src / "modeling_chatglm.py").write_text(code)
    return src


def test_chatglm_side_files_travel_verbatim(tmp_path) -> None:
    src = tiny_layout("chatglm", tmp_path / "src")
    convert(src, tmp_path / "glm", to="glm")
    convert(tmp_path / "glm", tmp_path / "back", to="chatglm")
    for name in ("modeling_chatglm.py", "tokenization_chatglm.py"):
        for out in ("glm", "back"):
            assert (tmp_path / out / name).read_bytes() == (src / name).read_bytes()


def test_chatglm2_32k_rope_ratio_divides_the_positions(tmp_path) -> None:
    """ChatGLM2-32k's modeling file divides the positions by rope_ratio: linear rope scaling."""
    src = _chatglm_with(tmp_path / "src", CHATGLM_POSITIONS_CODE)
    want = forward("chatglm", src, golden_input())
    base = tiny_layout("chatglm", tmp_path / "base")  # ChatGLM3's reading: the base times rope_ratio
    assert not torch.allclose(want, forward("chatglm", base, golden_input()))
    convert(src, tmp_path / "glm", to="glm")
    cfg = json.loads((tmp_path / "glm" / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5}
    glm = AutoModelForCausalLM.from_pretrained(tmp_path / "glm", attn_implementation="eager")
    torch.testing.assert_close(logits(glm), want)
    convert(tmp_path / "glm", tmp_path / "back", to="chatglm")
    assert_bitwise(read_tensors(src), read_tensors(tmp_path / "back"))


@pytest.mark.parametrize(("changes", "code", "named"), [
    ({}, "", "rope_ratio=2.5 without modeling_chatglm.py"),
    ({}, "class RotaryEmbedding: pass\n", "does not show whether rope_ratio=2.5"),
    ({"rmsnorm": False}, None, "rmsnorm=False (LayerNorm instead of RMSNorm)"),
    ({"apply_residual_connection_post_layernorm": True}, None, "the residual taken after the norm"),
    ({"post_layer_norm": False}, None, "post_layer_norm=False (no final norm)"),
    ({"position_encoding_2d": True}, None, "2D positions"),
], ids=["rope_ratio-no-code", "rope_ratio-unknown-code", "layernorm", "post-norm-residual",
        "no-final-norm", "chatglm-v1"])
def test_what_the_chatglm_row_cannot_hold_is_refused_by_name(changes, code, named, tmp_path) -> None:
    src = _chatglm_with(tmp_path / "src", code, **changes)
    with pytest.raises(InputError, match=re.escape(named)):
        convert(src, tmp_path / "dst", to="glm")
    assert not (tmp_path / "dst").exists()


def test_chatglm_rope_ratio_of_one_needs_no_modeling_file(tmp_path) -> None:
    src = _chatglm_with(tmp_path / "src", "", rope_ratio=None)
    convert(src, tmp_path / "glm", to="glm")
    glm = AutoModelForCausalLM.from_pretrained(tmp_path / "glm", attn_implementation="eager")
    torch.testing.assert_close(logits(glm), forward("chatglm", src, golden_input()))


def test_chatglm_inv_freq_buffer_must_be_base_10000(tmp_path) -> None:
    import safetensors.torch

    src = tiny_layout("chatglm", tmp_path / "src")
    tensors = read_tensors(src)
    tensors["transformer.rotary_pos_emb.inv_freq"] = tensors["transformer.rotary_pos_emb.inv_freq"] * 2
    safetensors.torch.save_file(tensors, src / "model.safetensors")
    with pytest.raises(InputError, match="'transformer.rotary_pos_emb.inv_freq' is not what"):
        convert(src, tmp_path / "dst", to="glm")


def test_chatglm_without_gqa_or_biases_converts_exactly(tmp_path) -> None:
    """multi_query_attention off: every head its own KV; add_qkv_bias off: no bias tensor."""
    import safetensors.torch

    src = _chatglm_with(tmp_path / "src", multi_query_attention=False, add_qkv_bias=False)
    tensors = {k: v for k, v in read_tensors(src).items() if not k.endswith("query_key_value.bias")}
    g = torch.Generator().manual_seed(7)
    for k in [k for k in tensors if k.endswith("query_key_value.weight")]:  # 3 x 6 heads of 16
        tensors[k] = torch.randn(3 * 6 * 16, tensors[k].shape[1], generator=g) / 8
    safetensors.torch.save_file(tensors, src / "model.safetensors")
    want = forward("chatglm", src, golden_input())
    convert(src, tmp_path / "glm", to="glm")
    glm = AutoModelForCausalLM.from_pretrained(tmp_path / "glm", attn_implementation="eager")
    torch.testing.assert_close(logits(glm), want)
    convert(tmp_path / "glm", tmp_path / "back", to="chatglm")
    assert_bitwise(read_tensors(src), read_tensors(tmp_path / "back"))
