"""The mixture of experts routes each token its own way, and the unified model equals
transformers' eager experts loop while it does (issue 14)."""

from __future__ import annotations

import pytest
import torch
from harness import UNIFIED_HELD

from reference.families.registry import FAMILIES
from reference.modeling import UnifiedForCausalLM
from reference.modeling.moe import MoE
from reference.tiny import golden_input, logits, tiny_model

MOE = [f for f in UNIFIED_HELD if FAMILIES[f].read(tiny_model(f).config.to_dict(), f).moe is not None]


def test_the_moe_rows_are_held() -> None:
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"} <= set(MOE)


@pytest.mark.parametrize("family", MOE)
def test_routing_differs_per_token_and_logits_equal_the_eager_loop(family: str, tmp_path) -> None:
    original = tiny_model(family)
    original.save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="eager")
    chosen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: chosen.append(mod.route(args[0].flatten(0, 1))[0]))
             for m in model.modules() if isinstance(m, MoE)]
    torch.testing.assert_close(logits(model), logits(original))
    for hook in hooks:
        hook.remove()
    assert chosen and len(chosen) == len(hooks)
    for layer in chosen:  # (tokens, top_k) expert indices of one layer
        assert layer.unique().numel() > 1  # more than one expert is chosen
        sets = {tuple(sorted(row.tolist())) for row in layer}
        assert len(sets) > 1  # at least one token's top-k differs from another's
    assert golden_input().numel() == chosen[0].shape[0]
