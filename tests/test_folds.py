"""What each fold costs, measured, in the dtypes checkpoints are published in: folded logits in
float32 equal the original's in float32; a roundtrip is bitwise wherever float32 can hold the
fold, and what it cannot hold is counted, per tensor, in the report."""

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


def test_residual_multiplier_folds_into_every_branch_that_adds_to_the_residual() -> None:
    """A mixture's output is its routed experts' and its shared expert's down projections, and a
    dense layer's its MLP's: each is scaled, so that a layer's whole output is (GraniteMoE's
    experts are proven in megatron-core by tests/megatron/test_megatron_moe.py)."""
    from dataclasses import replace

    from harness import tiny_spec

    from reference.families.spec import canonical_names

    spec = tiny_spec("qwen2_moe", False)
    spec = spec.replace(residual_multiplier=0.22, moe=replace(spec.moe, dense_layers=(0,)))
    names = FOLDS["residual_multiplier"].names(spec, set(canonical_names(spec)))
    outputs = {n for n in canonical_names(spec) if n.endswith(("attn.o.weight", "down.weight"))}
    assert len(names) == len(set(names)) and set(names) == outputs
    assert {"layers.0.mlp.down.weight", "layers.1.mlp.shared.down.weight",
            f"layers.1.mlp.experts.{spec.num_experts - 1}.down.weight"} <= outputs


def test_gemma_fold_is_bitwise_in_fp32(tmp_path) -> None:
    gemma = tiny_model("gemma", tie=True)
    gemma.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "llama", to="llama")
    assert [f.split(":")[0] for f in report.folds] == ["norm_offset", "embedding_multiplier"]
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="eager")
    assert torch.equal(logits(llama), logits(gemma))  # "logits bitwise equal in fp32"


def test_gemma_embedding_fold_in_its_dtype_is_bitwise_in_bf16(tmp_path) -> None:
    gemma = tiny_model("gemma", tie=True).to(torch.bfloat16)
    gemma.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "llama", to="llama", fold_precision="dtype")
    assert {c["written"] for c in report.fold_costs} == {"bfloat16"}
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


# Smallest |w| whose offset 1 + w float32 holds exactly: w's last bit must stay above 2^-23.
REPRESENTABLE = {torch.bfloat16: 2.0 ** -16, torch.float16: 2.0 ** -13}
NEAR_ZERO = (2.0 ** -20, -(2.0 ** -15), 3e-5, -2.0 ** -12, 1e-7, 0.0)


def near_zero_norms(model: torch.nn.Module) -> None:
    """Put values around the representable limit into every norm (the offset form stores w
    for a scale of 1 + w, so trained norms near 1 store values near 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p[: len(NEAR_ZERO)] = torch.tensor(NEAR_ZERO)


FP32 = {"dtype": torch.float32, "attn_implementation": "eager"}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


@DTYPES
def test_gemma_in_published_dtypes_is_exact_in_fp32_and_roundtrips_as_reported(dtype, tmp_path) -> None:
    family = "gemma"
    original = tiny_model(family, tie=True)
    near_zero_norms(original)
    original.to(dtype).save_pretrained(tmp_path / "src")
    there = convert(tmp_path / "src", tmp_path / "llama", to="llama")
    want = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "src", **FP32))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "llama", **FP32)), want)

    convert(tmp_path / "llama", tmp_path / "back", to=family)
    a, b = read_tensors(tmp_path / "src"), read_tensors(tmp_path / "back")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == dtype for k in a)
    reported = {c["tensor"]: c["changed"] for c in there.fold_costs}
    from reference.families.registry import FAMILIES

    for key in a:
        differ = a[key] != b[key]
        names, _ = FAMILIES[family].keys.canonical(key, family)
        assert int(differ.sum()) == reported.get(names[0], 0), key  # the report says what is lost
        if "norm" in key:  # lost only where float32 cannot hold 1 + w
            assert (a[key][differ].float().abs() < REPRESENTABLE[dtype]).all(), key
    small = sum(int(((t.float().abs() < REPRESENTABLE[dtype]) & (t != 0)).sum()) for k, t in a.items()
                if "norm" in k)
    assert 0 < sum(reported.values()) <= small  # the near-zero values below the limit


@DTYPES
def test_granite_in_published_dtypes_is_exact_in_fp32_and_reports_what_comes_back(dtype, tmp_path) -> None:
    """Back to granite through llama is another granite (multipliers 1), so the report's
    roundtrip is checked here by hand: each folded tensor divided by its factor, rounded back."""
    tiny_model("granite").to(dtype).save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "llama", to="llama")
    want = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "src", **FP32))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "llama", **FP32)), want)
    a, b = read_tensors(tmp_path / "src"), read_tensors(tmp_path / "llama")
    factors = {"embed_tokens": 12.0, "q_proj": 0.0078125 * 16**0.5, "o_proj": 0.22, "down_proj": 0.22,
               "lm_head": 1 / 8.0}
    reported = {c["tensor"]: c["changed"] for c in report.fold_costs}
    assert len(reported) == 1 + 3 * 2 + 1  # embedding, q, o and down in each layer, head
    for key, t in b.items():
        factor = next((f for part, f in factors.items() if part in key), None)
        if factor is not None:
            back = (t.float() / torch.tensor(factor, dtype=torch.float32)).to(dtype)
            name = key.removeprefix("model.").replace("embed_tokens", "embed").replace("self_attn", "attn")
            name = name.replace("_proj", "")
            assert int((back != a[key]).sum()) == reported[name], key


def test_folds_kept_in_their_dtype_record_the_rounding(tmp_path) -> None:
    original = tiny_model("gemma", tie=True)
    near_zero_norms(original)
    original.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "llama", to="llama", fold_precision="dtype")
    norms = [c for c in report.fold_costs if c["feature"] == "norm_offset"]
    assert all(c["written"] == c["stored"] == "bfloat16" for c in norms)
    assert sum(c["changed"] for c in norms) > 0 and max(c["max_error"] for c in norms) > 0
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(tmp_path / "llama").values())


def test_exact_folds_grow_only_what_they_must(tmp_path) -> None:
    tiny_model("gemma", tie=True).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "llama", to="llama")
    out = read_tensors(tmp_path / "llama")
    widened = {k for k, t in out.items() if t.dtype == torch.float32}
    assert widened == {"model.embed_tokens.weight"} | {k for k in out if "norm" in k}
    assert out["lm_head.weight"].dtype == torch.bfloat16  # the untied head keeps the original E
    grew = sum(c["grew_bytes"] for c in report.fold_costs)
    assert grew == sum(out[k].numel() * 2 for k in widened)


def test_normhead_fold_is_exact_one_way_in_bf16(tmp_path) -> None:
    import safetensors.torch
    from layouts import forward, tiny_layout

    oracle = tiny_layout("baichuan", tmp_path / "oracle")
    src = tiny_layout("baichuan", tmp_path / "src")
    for path, dtype in ((src, torch.bfloat16), (oracle, torch.float32)):  # the same bf16 values
        tensors = safetensors.torch.load_file(src / "model.safetensors")
        tensors = {k: v.to(torch.bfloat16).to(dtype) for k, v in tensors.items()}
        safetensors.torch.save_file(tensors, path / "model.safetensors", {"format": "pt"})
    report = convert(src, tmp_path / "llama", to="llama")
    [head] = [c for c in report.fold_costs if c["feature"] == "normalized_head"]
    assert head["changed"] is None and head["written"] == "float32"  # one-way, normalised in float32
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32,
                                                 attn_implementation="eager")
    torch.testing.assert_close(logits(llama), forward("baichuan", oracle, golden_input()))
