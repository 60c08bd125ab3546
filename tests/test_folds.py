"""What each fold costs, measured: the claims `reference families` prints are checked here."""

from __future__ import annotations

import pytest
import torch
from harness import read_tensors
from transformers import AutoModelForCausalLM

from reference.converters import convert
from reference.converters.folds import FOLDS
from reference.errors import Inexpressible
from reference.families.spec import FOLDABLE
from reference.tiny import golden_input, logits, save_tiny, tiny_model


def test_every_foldable_feature_has_a_fold() -> None:
    assert tuple(FOLDS) == FOLDABLE


def test_gemma_fold_is_bitwise_in_fp32(tmp_path) -> None:
    gemma = tiny_model("gemma", tie=True)
    gemma.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "llama", to="llama")
    assert [f.split(":")[0] for f in report.folds] == ["norm_offset", "embedding_multiplier"]
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="eager")
    assert torch.equal(logits(llama), logits(gemma))  # "logits bitwise equal in fp32"


def test_gemma_embedding_fold_is_bitwise_in_bf16(tmp_path) -> None:
    gemma = tiny_model("gemma", tie=True).to(torch.bfloat16)
    gemma.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "llama", to="llama")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16)
    ids = golden_input()
    assert torch.equal(llama.model.embed_tokens(ids), gemma.model.embed_tokens(ids))


def test_gemma_roundtrip_restores_the_tied_embedding_and_norms_within_one_ulp(tmp_path) -> None:
    src = save_tiny("gemma", tmp_path / "src", tie=True)
    convert(src, tmp_path / "llama", to="llama")
    convert(tmp_path / "llama", tmp_path / "back", to="gemma")
    a, b = read_tensors(src), read_tensors(tmp_path / "back")
    assert a.keys() == b.keys()  # tied again: the head was the original embedding
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    for k in a:
        ulp = torch.finfo(torch.float32).eps * (1 + a[k].abs())
        assert ((a[k] - b[k]).abs() <= ulp).all(), k  # (1 + w) - 1 is w up to one rounding


def test_phi3_partial_rotary_is_refused_naming_the_feature(tmp_path) -> None:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    src = save_tiny("phi3", tmp_path / "src", rope_parameters=rope)
    with pytest.raises(Inexpressible, match="'rotary_fraction'.*0.5"):
        convert(src, tmp_path / "dst", to="llama")
    assert not (tmp_path / "dst").exists()


def test_mistral_window_is_refused_unless_allowed(tmp_path) -> None:
    src = save_tiny("mistral", tmp_path / "src", sliding_window=8)
    with pytest.raises(Inexpressible, match="'sliding_window'"):
        convert(src, tmp_path / "dst", to="llama")
    report = convert(src, tmp_path / "dst", to="llama", allow=["sliding_window"])
    assert report.caveats == ["dropped sliding_window=8: llama computes without it"]
    ids = golden_input()[:, :8]  # exact while the sequence fits the window
    mistral = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="eager")
    torch.testing.assert_close(logits(llama, ids), logits(mistral, ids))
