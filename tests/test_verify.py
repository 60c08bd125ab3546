"""`reference verify` between HF directories (and a unified one): a good conversion is within
the noise floor (exit 0); one tensor moved by 1e-3 is far beyond it (exit 1); `--layers 1`
sees a layer-0 change only; bad input is one line, exit 2. Megatron sides:
tests/megatron/test_verify_megatron.py, and mixtures of experts tests/megatron/test_verify_moe.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from reference.cli import main
from reference.converters import convert
from reference.tiny import save_tiny

DELTA = 1e-3


def perturbed(src: Path, dst: Path, key: str) -> Path:
    """A copy of HF directory `src` with DELTA added to every value of tensor `key`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    tensors[key] = tensors[key] + DELTA
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Path:
    """root/qwen2 (tiny, 2 layers), root/llama (converted from it) and perturbed llamas."""
    root = tmp_path_factory.mktemp("verify")
    save_tiny("qwen2", root / "qwen2")
    convert(root / "qwen2", root / "llama", to="llama")
    perturbed(root / "llama", root / "first", "model.layers.0.self_attn.q_proj.weight")
    perturbed(root / "llama", root / "last", "model.layers.1.mlp.down_proj.weight")
    return root


def verify(capsys, *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def max_diff(out: str) -> float:
    return float(re.search(r"max \|src - dst\| = (\S+?),?\s", out).group(1))


def test_a_good_conversion_is_within_the_noise_floor(dirs, capsys) -> None:
    code, out = verify(capsys, dirs / "qwen2", dirs / "llama")
    assert code == 0, out
    assert "OK: within the noise floor" in out and "top-1 agreement 32/32" in out
    assert "transformers Qwen2ForCausalLM" in out and "transformers LlamaForCausalLM" in out


def test_one_tensor_moved_by_1e_3_is_beyond_it(dirs, capsys) -> None:
    code, out = verify(capsys, dirs / "qwen2", dirs / "first", "--tokens", 16)
    assert code == 1, out
    assert "DIFFERENT" in out and "16 tokens" in out
    limit = float(re.search(r"limit 10 x floor = (\S+)", out).group(1))
    assert max_diff(out) > 10 * limit  # not a near miss


def test_layers_1_sees_layer_0_only(dirs, capsys) -> None:
    code, out = verify(capsys, dirs / "qwen2", dirs / "first", "--layers", 1)
    assert code == 1 and "hidden states after layer 1" in out, out
    code, out = verify(capsys, dirs / "qwen2", dirs / "last", "--layers", 1)
    assert code == 0 and "OK" in out, out
    code, out = verify(capsys, dirs / "qwen2", dirs / "last")  # the same change, seen in full
    assert code == 1, out


def test_a_unified_directory_runs_in_the_unified_model(dirs, capsys, tmp_path) -> None:
    convert(dirs / "qwen2", tmp_path / "unified", to="unified")
    code, out = verify(capsys, tmp_path / "unified", dirs / "llama", "--tokens", 8)
    assert code == 0 and "reference unified model" in out, out


def _one_line_exit_2(capsys, *args: object) -> str:
    code, out = verify(capsys, *args)
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert out.startswith("reference verify: error: ")
    return out


def test_bad_input_is_one_line_exit_2(dirs, capsys, tmp_path) -> None:
    assert "no such checkpoint directory" in _one_line_exit_2(capsys, tmp_path / "nope", dirs / "llama")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "nosuchfamily"}))
    assert "nosuchfamily" in _one_line_exit_2(capsys, dirs / "llama", unknown)
    assert "--tokens 0" in _one_line_exit_2(capsys, dirs / "qwen2", dirs / "llama", "--tokens", 0)
    assert "--layers 3" in _one_line_exit_2(capsys, dirs / "qwen2", dirs / "llama", "--layers", 3)


def test_a_remote_code_family_is_refused_by_name(dirs, capsys, tmp_path) -> None:
    convert(dirs / "qwen2", tmp_path / "internlm2", to="internlm2")
    out = _one_line_exit_2(capsys, tmp_path / "internlm2", dirs / "qwen2")
    assert "family internlm2 has no class in transformers" in out


def test_cpu_side_steps_are_restored_on_exit() -> None:
    """The megatron-core patches hold inside the block only, even when it raises."""
    pytest.importorskip("megatron.core")
    import torch
    from megatron.core import tensor_parallel

    from reference.verify.cpu import cpu_side_steps

    before = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.synchronize,
              tensor_parallel.get_cuda_rng_tracker)
    with pytest.raises(KeyError), cpu_side_steps():
        assert torch.cuda.current_device() == "cpu"
        t = torch.ones(1)
        assert t.cuda() is t
        with tensor_parallel.get_cuda_rng_tracker().fork():
            pass
        raise KeyError("inside")
    assert (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.synchronize,
            tensor_parallel.get_cuda_rng_tracker) == before


def test_te_side_steps_are_restored_on_exit() -> None:
    """Without TransformerEngine, the MoE router's te_general_gemm (never defined) is None and
    latent attention's HAVE_TE False inside the block only, even when it raises."""
    pytest.importorskip("megatron.core")
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("TransformerEngine is installed: te_side_steps patches nothing")
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    from reference.verify.cpu import te_side_steps

    had_gemm, have_te = hasattr(moe_utils, "te_general_gemm"), multi_latent_attention.HAVE_TE
    with pytest.raises(KeyError), te_side_steps():
        assert moe_utils.te_general_gemm is None and multi_latent_attention.HAVE_TE is False
        raise KeyError("inside")
    assert hasattr(moe_utils, "te_general_gemm") == had_gemm
    assert multi_latent_attention.HAVE_TE == have_te
