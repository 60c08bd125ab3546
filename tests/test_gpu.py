"""On a GPU: what the CPU suite proves, again where the kernels and the process group differ.

Skipped without CUDA (CI has none); run where a GPU is lent, with the rest of the device
check (docs/gpu.md):

    PYTHONPATH=.:tests python -m pytest -q -p no:randomly tests/test_gpu.py

- the unified model on cuda equals transformers on cuda in fp32 at assert_close defaults, for
  every family it holds, under both attention backends, and generates the same tokens;
- blocks spread over cuda:0 and the CPU give one device's logits and tokens;
- `reference verify` runs megatron-core's ranks under NCCL (one rank per GPU: TP 1 here) on a
  conversion in each Megatron format, passes it, and fails a perturbed one;
(multi_infer on a GPU: tests/infer/test_infer_gpu.py.)
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from harness import UNIFIED_HELD

from reference.modeling import UnifiedForCausalLM
from reference.tiny import golden_input, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda:0"
BACKENDS = ("eager", "sdpa")


def _on(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(CUDA), attention_mask=None if mask is None else mask.to(CUDA)).logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", UNIFIED_HELD)
def test_unified_equals_transformers_on_cuda(family: str, backend: str, tmp_path) -> None:
    original = tiny_model(family)
    original.save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src", attn_implementation=backend).to(CUDA)
    assert next(model.parameters()).device.type == "cuda"
    torch.testing.assert_close(_on(model, golden_input()), _on(original.to(CUDA), golden_input()))


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :1] = 0, 0  # prompts of 5, 8 and 9 tokens, padded on the left
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_on_cuda_equals_transformers(backend: str, tmp_path) -> None:
    original = tiny_model("mistral", sliding_window=6, pad_token_id=0)  # a stopped row: pad 0 in both
    original.save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src", attn_implementation=backend).to(CUDA)
    ids, mask = (t.to(CUDA) for t in _padded())
    args = {"attention_mask": mask, "max_new_tokens": 12, "eos_token_id": 2}
    greedy = {"do_sample": False, "pad_token_id": 0}
    want = original.to(CUDA).generate(ids, **args, **greedy)
    torch.testing.assert_close(model.generate(ids, **args, **greedy), want, rtol=0, atol=0)
    streamed = torch.stack(list(model.stream_generate(ids, **args)), dim=-1)  # pads a stopped row with 0
    torch.testing.assert_close(streamed.to(want.device), want[:, ids.shape[1]:], rtol=0, atol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_blocks_over_cuda_and_cpu_equal_one_device(tie: bool, tmp_path) -> None:
    tiny_model("llama", tie=tie, num_hidden_layers=4, eos_token_id=1).save_pretrained(tmp_path / "src")
    one = UnifiedForCausalLM.from_pretrained(tmp_path / "src").to(CUDA)
    two = UnifiedForCausalLM.from_pretrained(tmp_path / "src").set_device([CUDA, "cpu"])
    assert {p.device.type for p in two.layers.parameters()} == {"cuda", "cpu"}
    ids, mask = _padded()
    with torch.no_grad():
        got = two(ids.to(CUDA), attention_mask=mask.to(CUDA)).logits
    real = mask.bool().to(CUDA)  # a padding position attends to nothing: its logits are no answer
    torch.testing.assert_close(got.to(CUDA)[real], _on(one, ids, mask)[real])
    want = list(one.stream_generate(ids.to(CUDA), attention_mask=mask.to(CUDA), max_new_tokens=8))
    got_tokens = list(two.stream_generate(ids.to(CUDA), attention_mask=mask.to(CUDA), max_new_tokens=8))
    assert torch.equal(torch.stack([t.cpu() for t in got_tokens]), torch.stack([t.cpu() for t in want]))


# qwen3: GQA 2 groups of 2, head_dim != hidden / heads, qk norm; mixtral: experts (EP 1 on one
# GPU); deepseek_v3: latent attention and sigmoid routing (at its published eps: megatron-core's
# latent norms take the model's)
@pytest.mark.parametrize(("family", "fmt"), [("qwen3", "torch"), ("qwen3", "torch_dist"),
                                             ("mixtral", "torch"), ("deepseek_v3", "torch_dist")])
def test_verify_runs_megatron_core_under_nccl(family: str, fmt: str, tmp_path) -> None:
    from reference.converters import convert
    from reference.converters.megatron import MegatronLayout
    from reference.verify.compare import report, verify

    assert torch.cuda.device_count() >= 1  # TP 1 x PP 1: one rank, on the GPU, joined under NCCL
    tiny_model(family, rms_norm_eps=1e-6).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mcore", to="megatron", layout=MegatronLayout(ckpt_format=fmt))
    good = verify(tmp_path / "hf", tmp_path / "mcore")
    print("\n".join(report(good)))
    assert good.ok and good.top1 == good.tokens, report(good)

    convert(tmp_path / "mcore", tmp_path / "back", to=family)
    shard = tmp_path / "back" / "model.safetensors"
    tensors = safetensors.torch.load_file(shard)
    name = "model.layers.1.self_attn.o_proj.weight"  # every token goes through it
    tensors[name] = tensors[name] + 1e-3
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    bad = verify(tmp_path / "back", tmp_path / "mcore")
    assert not bad.ok and bad.max_diff > bad.limit, report(bad)
