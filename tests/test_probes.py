"""The probes against what transformers reports for the same weights: hidden states and
attentions of the original (eager) model, with the unified model on either backend; the last
layer's logit lens against the model's own next-token distribution; and `reference inspect`."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from reference.cli import main
from reference.modeling import UnifiedForCausalLM
from reference.tiny import golden_input, save_tiny, tiny_model, tiny_tokenizer

# llama: GQA, plain causal; gemma2: a window (4) shorter than the sequence (12) on every other
# layer, an attention softcap, query_pre_attn_scalar, Gemma's offset norms and final softcap
FAMILIES = ("llama", "gemma2")
TEXT = "the quick brown fox jumps over the lazy dog"


def hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def padded_input() -> tuple[torch.Tensor, torch.Tensor]:
    """The golden ids, row 1 left-padded by 3: padding masks the keys as well as the window."""
    ids = golden_input()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def original_run(family: str, path) -> tuple[torch.nn.Module, object, torch.Tensor]:
    """The original eager model's outputs with hidden states and attentions, and its last
    layer's output before the final norm (HF's last hidden state is after it)."""
    original = tiny_model(family)
    original.save_pretrained(path)
    ids, mask = padded_input()
    last: list[torch.Tensor] = []
    handle = original.model.layers[-1].register_forward_hook(lambda _m, _a, out: last.append(
        out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = original(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    handle.remove()
    return original, out, last[0]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_probes_equal_what_transformers_reports(family: str, backend: str, tmp_path) -> None:
    original, out, last = original_run(family, tmp_path)
    model = UnifiedForCausalLM.from_pretrained(tmp_path, attn_implementation=backend)
    ids, mask = padded_input()
    with torch.no_grad(), model.record():
        logits = model(input_ids=ids, attention_mask=mask).logits
    n = len(model.layers)
    states = [*out.hidden_states[:n], last]  # every layer's input, then the last one's output
    for i in range(n):
        want = 1 - F.cosine_similarity(states[i], states[i + 1], dim=-1)
        torch.testing.assert_close(model.show_cos_distance(i), want)
        torch.testing.assert_close(model.attention_weights(i), out.attentions[i])
        torch.testing.assert_close(model.show_attention(i, 9, 7), out.attentions[i][0, :, 9, 7])
        torch.testing.assert_close(model.show_attention(i, -1, 5, head=4, row=1),
                                   out.attentions[i][1, 4, -1, 5])
    if family == "gemma2":  # the window is in the weights: layer 0 slides (4), layer 1 does not
        assert model.show_attention(0, 11, 7).sum() == 0 and model.show_attention(1, 11, 7).sum() > 0

    lens = model.show_topk_token(-1, k=10)
    want = logits.float().softmax(-1).topk(10)
    torch.testing.assert_close(lens.probs, want.values)
    assert torch.equal(lens.ids, want.indices)
    assert lens.at(3, row=1)[0] == (int(want.indices[1, 3, 0]), float(want.values[1, 3, 0]))
    full = model.show_topk_token(-1, k=model.spec.vocab_size)
    torch.testing.assert_close(full.probs.sum(-1), torch.ones(2, 12))


def test_a_middle_layer_lens_applies_the_final_norm_and_head_once(tmp_path) -> None:
    """The lens of layer 0 is softmax(head(norm(h0))), with gemma2's final softcap and the
    embedding-scaled residual: the same computation transformers' own norm and head do."""
    original, out, _ = original_run("gemma2", tmp_path)
    model = UnifiedForCausalLM.from_pretrained(tmp_path)
    ids, mask = padded_input()
    with torch.no_grad(), model.record():
        model(input_ids=ids, attention_mask=mask)
        hf = original.lm_head(original.model.norm(out.hidden_states[1]))
        cap = original.config.final_logit_softcapping
        want = (torch.tanh(hf / cap) * cap).softmax(-1).topk(3)
    lens = model.show_topk_token(0, k=3)
    torch.testing.assert_close(lens.probs, want.values)
    assert torch.equal(lens.ids, want.indices)


def test_record_is_free_outside_and_leaves_no_hooks(tmp_path) -> None:
    save_tiny("llama", tmp_path)
    model = UnifiedForCausalLM.from_pretrained(tmp_path)
    assert hooks(model) == 0
    with pytest.raises(RuntimeError, match="model.record"):
        model.show_cos_distance(0)
    with torch.no_grad(), model.record():
        assert hooks(model) > 0
        model(input_ids=golden_input())
    assert hooks(model) == 0
    recorded = model.show_cos_distance(1)
    with torch.no_grad():
        model(input_ids=golden_input()[:, :5])  # not recorded: the probes still read the last one
    assert model.show_cos_distance(1).shape == recorded.shape == (2, 12)
    with pytest.raises(ValueError, match="inside"), model.record():
        raise ValueError("inside")
    assert hooks(model) == 0
    with pytest.raises(IndexError, match="2 layers"):
        model.show_cos_distance(2)


def test_tokens_as_strings_and_the_tables(tmp_path, capsys) -> None:
    save_tiny("gemma2", tmp_path)
    model = UnifiedForCausalLM.from_pretrained(tmp_path)
    tokenizer = tiny_tokenizer()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    words = [tokenizer.decode([i]) for i in ids[0].tolist()]
    with torch.no_grad(), model.record():
        model(input_ids=ids)
    with pytest.raises(ValueError, match="tokenizer"):
        model.show_attention(1, "fox", "the")
    fox = words.index("fox")
    by_string = model.show_attention(1, "fox", "the", tokenizer=tokenizer)  # the first "the"
    torch.testing.assert_close(by_string, model.show_attention(1, fox, 0))
    with pytest.raises(ValueError, match="no token of the recorded text"):
        model.show_attention(1, "cat", "the", tokenizer=tokenizer)

    model.tokenizer = tokenizer
    lens = model.show_topk_token(1, k=2, show=True)
    assert lens.tokens[0][fox] == [tokenizer.decode([i]) for i in lens.ids[0, fox].tolist()]
    model.show_cos_distance(0, show=True)
    model.show_attention(1, "fox", None, show=True)
    shown = capsys.readouterr().out
    assert "layer 1: logit lens, the 2 most likely next tokens" in shown
    assert "layer 0: cosine distance between its input and output" in shown
    assert f"layer 1: attention of query {fox} (fox) per head" in shown
    table = shown.split("attention of query")[1].splitlines()
    assert table[1].split()[:3] == ["key", "token", "head"] and len(table) == 2 + 1 + fox + 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny 4-layer gemma2 with the tiny tokenizer in its directory."""
    path = save_tiny("gemma2", tmp_path_factory.mktemp("m") / "gemma2", num_hidden_layers=4)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_inspect_prints_the_tables_and_writes_titled_heat_maps(demo, tmp_path, capsys) -> None:
    from matplotlib.image import imread

    assert main(["inspect", str(demo), "--text", TEXT, "--layer", "2", "--plot", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    for line in ("layer 2: cosine distance", "layer 2: logit lens, the 5 most likely",
                 "layer 2: attention of query"):
        assert line in shown
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["attention_layer2.png", "cos_distance.png", "logit_lens.png"]
    for name in names:
        image = imread(tmp_path / name)[..., :3]  # (H, W, RGB) in 0..1
        assert image.std() > 0.1, f"{name} looks blank"
        top = image[: image.shape[0] // 12]  # the title's strip: dark text on white
        assert (top < 0.3).any() and (top > 0.9).mean() > 0.5, f"{name} has no title"


def test_inspect_without_matplotlib_names_the_extra(demo, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # unimportable: find_spec says absent
    assert main(["inspect", str(demo), "--text", TEXT, "--plot", str(tmp_path / "plots")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "reference inspect: error: needs matplotlib: pip install 'reference[train]'"]
    assert not (tmp_path / "plots").exists()


def test_inspect_refuses_a_layer_out_of_range(demo, capsys) -> None:
    assert main(["inspect", str(demo), "--text", TEXT, "--layer", "4"]) == 2
    assert "--layer 4" in capsys.readouterr().err
