"""UnifiedForRewardModel against each family's ForSequenceClassification (fp32, num_labels=1):
equal scores whenever pad != eos; with pad == eos, the trunk and score head read at each row's
last attended token (where transformers, pooling by `input_ids != pad`, skips a real eos)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from harness import UNIFIED_HELD, assert_bitwise, read_tensors
from layouts import tiny_layout
from transformers import AutoModelForSequenceClassification

from reference.converters import convert
from reference.converters.plan import sequence_classifier
from reference.errors import InputError
from reference.modeling import UnifiedForCausalLM, UnifiedForRewardModel
from reference.tiny import fill, tiny_config, tiny_model

SCORED = [f for f in UNIFIED_HELD if sequence_classifier(f) is not None]
UNSCORED = [f for f in UNIFIED_HELD if f not in SCORED]
PAD, EOS = 0, 2


def seq_cls_model(family: str, *, tie: bool = False, pad: int = PAD, eos: int = EOS) -> torch.nn.Module:
    """transformers' <Family>ForSequenceClassification of the tiny shape, num_labels=1, filled."""
    config = tiny_config(family, tie=tie, num_labels=1, pad_token_id=pad, eos_token_id=eos)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                           attn_implementation="eager")
    fill(model, 0)
    return model.eval()


def batch(side: str, eos: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 10, 7 and 4 tokens, each ending in eos, padded on `side` with PAD."""
    ids = torch.randint(3, 250, (3, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.zeros_like(ids)
    for row, n in enumerate((10, 7, 4)):
        span = slice(0, n) if side == "right" else slice(10 - n, 10)
        mask[row, span] = 1
        ids[row, span.stop - 1] = eos
    return ids.masked_fill(mask == 0, PAD), mask


def by_hand(original: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original's trunk and score head, read at each row's last attended token: (B, 1)."""
    hidden = original.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    values = original.score(hidden)  # (B, T, 1)
    last = torch.stack([row.nonzero().max() for row in mask])
    return values[torch.arange(len(ids)), last]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", SCORED)
def test_scores_equal_the_sequence_classifier_when_pad_is_not_eos(family: str, side: str, tmp_path) -> None:
    original = seq_cls_model(family)
    original.save_pretrained(tmp_path / "src")
    model = UnifiedForRewardModel.from_pretrained(tmp_path / "src")
    ids, mask = batch(side)
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got, by_hand(original, ids, mask))
        values = model.values(ids, attention_mask=mask)  # (B, T), per token
        hidden = original.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        want_values = original.score(hidden).squeeze(-1)
    assert values.shape == ids.shape
    torch.testing.assert_close(values[mask.bool()], want_values[mask.bool()])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "olmo"])
def test_pad_equal_to_eos_pools_the_last_attended_token(family: str, side: str, tmp_path) -> None:
    original = seq_cls_model(family, pad=EOS, eos=EOS)
    original.save_pretrained(tmp_path / "src")
    model = UnifiedForRewardModel.from_pretrained(tmp_path / "src")
    ids, mask = batch(side)
    ids = ids.masked_fill(mask == 0, EOS)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, by_hand(original, ids, mask))
        hf = original(input_ids=ids, attention_mask=mask).logits
    # transformers pools at the last token that is not the pad id: the one before each real eos
    assert not torch.allclose(hf, got)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llama", "gemma", "stablelm", "gpt_neox", "gemma3_text"])
def test_a_score_head_converts_to_unified_and_back_bitwise(family: str, tie: bool, tmp_path) -> None:
    original = seq_cls_model(family, tie=tie)
    original.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "unified", to="unified")
    assert not report.folds and not report.caveats
    config = json.loads((tmp_path / "unified" / "config.json").read_text())
    assert config["architectures"] == ["UnifiedForRewardModel"]
    assert "score.weight" in read_tensors(tmp_path / "unified")
    assert "lm_head.weight" not in read_tensors(tmp_path / "unified")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "unified")
    assert isinstance(model, UnifiedForRewardModel)
    ids, mask = batch("right")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                   original(ids, attention_mask=mask).logits)

    convert(tmp_path / "unified", tmp_path / "back", to=family)
    assert_bitwise(read_tensors(tmp_path / "src"), read_tensors(tmp_path / "back"))
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "back")]
    assert configs[0] == configs[1]


def test_save_pretrained_then_the_family_class_reads_it(tmp_path) -> None:
    original = seq_cls_model("qwen3")
    original.save_pretrained(tmp_path / "src")
    UnifiedForRewardModel.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "saved")
    again = UnifiedForRewardModel.from_pretrained(tmp_path / "saved")
    convert(tmp_path / "saved", tmp_path / "qwen3", to="qwen3")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "qwen3", attn_implementation="eager")
    assert type(back).__name__ == "Qwen3ForSequenceClassification"
    ids, mask = batch("left")
    with torch.no_grad():
        want = original(ids, attention_mask=mask).logits
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, want)
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want)


def _with_score(path, hidden: int = 72) -> None:
    """Turn a causal checkpoint into a sequence-classification layout: no lm_head, a score head."""
    file = path / "model.safetensors"
    tensors = {k: v for k, v in safetensors.torch.load_file(file).items() if not k.endswith("lm_head.weight")}
    tensors["score.weight"] = torch.zeros(1, hidden)
    safetensors.torch.save_file(tensors, file, {"format": "pt"})


@pytest.mark.parametrize("family", UNSCORED)
def test_a_family_without_a_sequence_classifier_is_refused_by_name(family: str, tmp_path) -> None:
    tiny_model(family).save_pretrained(tmp_path / "src")
    _with_score(tmp_path / "src")
    with pytest.raises(InputError, match=f"{family} has no sequence-classification class"):
        UnifiedForRewardModel.from_pretrained(tmp_path / "src")


@pytest.mark.parametrize("layout", ["internlm2", "qwen"])
def test_a_remote_code_layout_with_a_score_head_is_refused_by_name(layout: str, tmp_path) -> None:
    src = tiny_layout(layout, tmp_path / "src")
    _with_score(src)
    with pytest.raises(InputError, match="has no sequence-classification class"):
        UnifiedForRewardModel.from_pretrained(src)


@pytest.mark.parametrize("to", ["granite", "megatron"])
def test_a_score_head_is_not_written_where_it_cannot_be_read(to: str, tmp_path) -> None:
    seq_cls_model("llama").save_pretrained(tmp_path / "src")
    with pytest.raises(InputError, match="granite has no sequence-classification|reward model"):
        convert(tmp_path / "src", tmp_path / "dst", to=to)
    assert not (tmp_path / "dst").exists()


def test_each_class_refuses_the_other_head(tmp_path) -> None:
    seq_cls_model("llama").save_pretrained(tmp_path / "cls")
    tiny_model("llama").save_pretrained(tmp_path / "lm")
    with pytest.raises(InputError, match="load it with UnifiedForRewardModel"):
        UnifiedForCausalLM.from_pretrained(tmp_path / "cls")
    with pytest.raises(InputError, match="no 'score.weight'"):
        UnifiedForRewardModel.from_pretrained(tmp_path / "lm")
