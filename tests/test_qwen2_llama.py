"""Qwen2 <-> Llama, the first customer: exactness, config semantics, refusals, side files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import assert_bitwise, read_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from reference.converters import convert
from reference.errors import Inexpressible
from reference.tiny import fill, golden_input, logits, save_tiny, tiny_model

MATTERS = ("rope_parameters", "rms_norm_eps", "head_dim", "tie_word_embeddings", "sliding_window",
           "vocab_size", "num_key_value_heads", "num_attention_heads", "hidden_size",
           "intermediate_size", "num_hidden_layers", "max_position_embeddings", "hidden_act")


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_config_fields_that_matter_survive_the_roundtrip(tmp_path) -> None:
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    src = save_tiny("qwen2", tmp_path / "src", rope_parameters=rope, rms_norm_eps=3e-6, tie=True,
                    bos_token_id=7, eos_token_id=[8, 9])
    convert(src, tmp_path / "llama", to="llama")
    convert(tmp_path / "llama", tmp_path / "back", to="qwen2")
    a, mid, b = config(src), config(tmp_path / "llama"), config(tmp_path / "back")
    for key in MATTERS:
        assert a.get(key) == mid.get(key) == b.get(key), key  # Llama has no window field: None
    assert (mid["bos_token_id"], mid["eos_token_id"]) == (7, [8, 9])
    assert_bitwise(read_tensors(src), read_tensors(tmp_path / "back"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kv=st.integers(1, 3), groups=st.integers(1, 4), head_dim=st.sampled_from([4, 8, 12]),
    layers=st.integers(1, 3), vocab=st.integers(17, 300), tie=st.booleans(), seed=st.integers(0, 99),
)
def test_roundtrip_is_bitwise_for_any_shape(tmp_path_factory, kv, groups, head_dim, layers, vocab,
                                            tie, seed) -> None:
    heads = kv * groups
    tmp = tmp_path_factory.mktemp("rt")
    shape = dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                 hidden_size=heads * 8, num_hidden_layers=layers, vocab_size=vocab, intermediate_size=40)
    model = tiny_model("qwen2", tie=tie, seed=seed, **shape)
    model.save_pretrained(tmp / "src")
    convert(tmp / "src", tmp / "llama", to="llama")
    convert(tmp / "llama", tmp / "back", to="qwen2")
    assert_bitwise(read_tensors(tmp / "src"), read_tensors(tmp / "back"))
    ids = golden_input() % vocab
    llama = AutoModelForCausalLM.from_pretrained(tmp / "llama", attn_implementation="eager")
    torch.testing.assert_close(logits(llama, ids), logits(model, ids))


def test_llama_without_o_bias_goes_to_qwen2_exactly(tmp_path) -> None:
    # A Llama with q/k/v bias but zero o_proj bias is exactly a Qwen2.
    model = tiny_model("llama", attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "qwen2", to="qwen2")
    qwen2 = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2", attn_implementation="eager")
    torch.testing.assert_close(logits(qwen2), logits(model))


def test_llama_with_nonzero_o_bias_is_refused_naming_the_feature(tmp_path) -> None:
    src = save_tiny("llama", tmp_path / "src", attention_bias=True)
    with pytest.raises(Inexpressible, match=r"qwen2 cannot express feature 'o_bias'.*o_proj\.bias"):
        convert(src, tmp_path / "dst", to="qwen2")
    assert not (tmp_path / "dst").exists()


def test_sliding_window_is_refused_or_dropped_with_a_record(tmp_path) -> None:
    src = save_tiny("qwen2", tmp_path / "src", use_sliding_window=True, sliding_window=8,
                    max_window_layers=0)
    with pytest.raises(Inexpressible, match="sliding_window"):
        convert(src, tmp_path / "dst", to="llama")
    report = convert(src, tmp_path / "dst", to="llama", allow=["sliding_window"])
    assert report.caveats and "sliding_window=8" in report.caveats[0]
    assert json.loads((tmp_path / "dst" / "conversion.json").read_text())["caveats"] == report.caveats
    # Exact while the sequence fits the window (12 tokens would not fit 8).
    ids = golden_input()[:, :8]
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="eager")
    original = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager")
    torch.testing.assert_close(logits(llama, ids), logits(original, ids))


def test_dtype_is_kept_unless_asked(tmp_path) -> None:
    model = tiny_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "kept", to="llama")
    assert {t.dtype for t in read_tensors(tmp_path / "kept").values()} == {torch.bfloat16}
    convert(tmp_path / "src", tmp_path / "f32", to="llama", dtype="float32")
    assert {t.dtype for t in read_tensors(tmp_path / "f32").values()} == {torch.float32}
    assert config(tmp_path / "f32")["dtype"] == "float32"
    assert config(tmp_path / "kept")["dtype"] == "bfloat16"


def test_tokenizer_and_generation_files_are_copied_verbatim(tmp_path) -> None:
    src = save_tiny("qwen2", tmp_path / "src")
    side = {"tokenizer.json": '{"x": 1}', "tokenizer_config.json": '{"chat_template": "{{x}}"}',
            "special_tokens_map.json": "{}", "chat_template.jinja": "{{ messages }}",
            "merges.txt": "a b\n", "vocab.json": "{}"}
    for name, text in side.items():
        (src / name).write_text(text)
    convert(src, tmp_path / "dst", to="llama")
    for name, text in side.items():
        assert (tmp_path / "dst" / name).read_text() == text
    generation = "generation_config.json"
    assert (tmp_path / "dst" / generation).read_bytes() == (src / generation).read_bytes()


def test_output_is_sharded_with_an_index_and_loads(tmp_path) -> None:
    src = save_tiny("qwen2", tmp_path / "src")
    convert(src, tmp_path / "dst", to="llama", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in (tmp_path / "dst").glob("model-*"))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in read_tensors(tmp_path / "dst").values())


def test_output_is_sharded_as_the_source_was(tmp_path) -> None:
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    convert(src, tmp_path / "dst", to="mistral")  # the same tensors under other names
    shards = sorted(src.glob("*.safetensors"))
    out = sorted((tmp_path / "dst").glob("*.safetensors"))
    assert len(shards) > 3 and len(out) == len(shards)
    assert max(p.stat().st_size for p in out) <= max(p.stat().st_size for p in shards)


def test_fill_depends_on_seed_and_names_not_on_transformers_init() -> None:
    torch.manual_seed(1)
    a = tiny_model("qwen2", seed=3)
    torch.manual_seed(2)  # a different random init underneath
    b = tiny_model("qwen2", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    fill(b, seed=4)
    assert not torch.equal(sa["lm_head.weight"], b.state_dict()["lm_head.weight"])
