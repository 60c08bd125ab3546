"""Training the unified model changes nothing a trainer sees: one step's loss and every gradient
equal transformers' (fp32, default tolerance) on five families, with and without gradient
checkpointing; a PEFT LoRA adapter on the canonical module names trains; `reference train`
runs on a unified directory."""

from __future__ import annotations

import pytest
import torch

from reference.converters import convert
from reference.families.registry import FAMILIES
from reference.modeling import UnifiedForCausalLM
from reference.tiny import tiny_model

FAMILIES_TRAINED = [("llama", False), ("qwen2", True), ("qwen3", False), ("phi3", False), ("gemma", True),
                    ("granite", False)]


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 250, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt masked out of the loss
    return {"input_ids": ids, "labels": labels}


def canonical_grads(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The original model's gradients under canonical names, fused ones split by the key map."""
    row, spec = FAMILIES[family], None
    from reference.families.resolve import as_loaded

    spec = row.read(as_loaded(model.config.to_dict(), family), family)
    out = {}
    for name, p in model.named_parameters():
        names, fused = row.keys.canonical(name, family)
        parts = fused.split(p.grad, spec) if fused is not None else [p.grad]
        out.update(zip(names, parts, strict=True))
    return out


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize(("family", "tie"), FAMILIES_TRAINED)
def test_one_training_step_equals_transformers(family: str, tie: bool, checkpointing: bool, tmp_path) -> None:
    original = tiny_model(family, tie=tie)
    original.save_pretrained(tmp_path / "src")
    unified = UnifiedForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="eager")
    original.train()
    unified.train()
    if checkpointing:
        unified.gradient_checkpointing_enable()
        assert all(layer.gradient_checkpointing for layer in unified.layers)
    want, got = original(**batch()).loss, unified(**batch()).loss
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    grads = {n: p.grad for n, p in unified.named_parameters()}
    expected = canonical_grads(original, family)
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], msg=lambda m, n=name: f"{n}: {m}")


def test_lora_on_canonical_names_trains(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    tiny_model("qwen2").save_pretrained(tmp_path / "src")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "src")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "gate"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_reference_train_runs_on_a_unified_directory(tmp_path) -> None:
    import argparse
    import json

    from reference.train import cli

    tiny_model("llama", vocab_size=64).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "unified", to="unified")
    data = tmp_path / "data.jsonl"
    rows = [{"input_ids": [(i * 7 + j) % 60 + 2 for j in range(8)], "channel": "ab"[i % 2]} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "unified"), str(data), str(tmp_path / "out"),
                              "--max-steps", "2", "--batch-size", "4", "--log-every", "2"])
    assert cli.run(args) == 0
    record = json.loads((tmp_path / "out" / "channel_loss.jsonl").read_text().splitlines()[0])
    assert set(record["channels"]) == {"a", "b"} and record["loss"] > 0
