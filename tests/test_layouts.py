"""Remote-code checkpoint layouts (Baichuan2-7B, InternLM2, Qwen v1) against a reference forward
written from their published modeling code (tests/layouts.py)."""

from __future__ import annotations

import json

import pytest
import torch
from harness import assert_bitwise, check_golden, read_tensors
from layouts import CONFIGS, forward, tiny_layout
from transformers import AutoModelForCausalLM

from reference.converters import convert
from reference.errors import Inexpressible
from reference.tiny import golden_input, logits


@pytest.mark.parametrize("layout", list(CONFIGS))
def test_layout_to_llama_and_back(layout: str, tmp_path) -> None:
    src = tiny_layout(layout, tmp_path / "src")
    want = forward(layout, src, golden_input())
    check_golden(layout, False, want)

    there = convert(src, tmp_path / "llama", to="llama")
    llama, info = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", output_loading_info=True,
                                                       attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(llama), want)

    back = convert(tmp_path / "llama", tmp_path / "back", to=layout)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == layout
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
