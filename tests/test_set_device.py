"""model.set_device: blocks spread over devices give the same logits and generations as one
device (on the CPU here: ["cpu", "cpu"] runs every boundary move; the device tool runs
["cuda:0", "cpu"] when a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

from reference.modeling import UnifiedForCausalLM, UnifiedForRewardModel
from reference.tiny import golden_input, tiny_model


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = golden_input()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo"])  # olmo: a parameter-free final norm
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_two_cpus_equal_one(family: str, tie: bool, tmp_path) -> None:
    tiny_model(family, tie=tie, eos_token_id=1).save_pretrained(tmp_path / "src")
    one = UnifiedForCausalLM.from_pretrained(tmp_path / "src")
    two = UnifiedForCausalLM.from_pretrained(tmp_path / "src").set_device(["cpu", "cpu"], weights=[1, 3])
    ids, mask = _padded()
    with torch.no_grad():
        torch.testing.assert_close(two(ids, attention_mask=mask).logits, one(ids, attention_mask=mask).logits)
    want = list(one.stream_generate(ids, attention_mask=mask, max_new_tokens=8))
    got = list(two.stream_generate(ids, attention_mask=mask, max_new_tokens=8))
    assert torch.equal(torch.stack(got), torch.stack(want))
    assert two.set_device("cpu") is two  # one device undoes it


def test_set_device_places_the_blocks_as_planned(tmp_path) -> None:
    tiny_model("llama", num_hidden_layers=4).save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src")
    moved: list[str] = []
    for name, module in [("embed", model.embed), ("norm", model.norm), ("lm_head", model.lm_head),
                         *((f"layers.{i}", m) for i, m in enumerate(model.layers))]:
        module.to = lambda device, n=name, m=module: (moved.append(f"{n}:{device}"), m)[1]
    model.set_device(["cpu:0", "cpu:1"], weights=[3, 1])  # recorded, not moved: CPU indices are one device
    assert moved == ["embed:cpu:0", "layers.0:cpu:0", "layers.1:cpu:0", "layers.2:cpu:0", "layers.3:cpu:1",
                     "norm:cpu:1", "lm_head:cpu:1"]


def test_reward_model_on_two_cpus_equals_one(tmp_path) -> None:
    from test_reward import seq_cls_model

    seq_cls_model("qwen2").save_pretrained(tmp_path / "src")
    one = UnifiedForRewardModel.from_pretrained(tmp_path / "src")
    two = UnifiedForRewardModel.from_pretrained(tmp_path / "src").set_device(["cpu", "cpu"])
    ids, mask = _padded()
    with torch.no_grad():
        torch.testing.assert_close(two(ids, attention_mask=mask).logits, one(ids, attention_mask=mask).logits)
