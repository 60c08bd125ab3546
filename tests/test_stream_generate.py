"""UnifiedForCausalLM.stream_generate: a plain generator, token for token what transformers'
generate() gives, stopping each row on its own, decoding whole characters, closable."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from reference.modeling import UnifiedForCausalLM
from reference.tiny import tiny_model

VOCAB = 300  # a byte-level tokenizer needs the 256 bytes and some merges
CORPUS = ["héllo wörld, ça va? 日本語のテキスト", "the quick brown fox jumps over the lazy dog",
          "naïve café résumé — ünïcödé 🙂 emoji", "stop here. then go on; and on, and on."] * 20


def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a few lines (multi-byte characters span tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def prompts(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 5, 8 and 9 tokens, padded on the left with 0."""
    ids = torch.randint(3, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4], mask[1, :1] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def models(family: str, tmp_path, **overrides) -> tuple[torch.nn.Module, UnifiedForCausalLM]:
    original = tiny_model(family, vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, **overrides)
    original.save_pretrained(tmp_path / family)
    return original, UnifiedForCausalLM.from_pretrained(tmp_path / family)


@pytest.mark.parametrize(("family", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 6}),
                                                   ("gemma2", {}), ("qwen3", {})])
def test_greedy_stream_equals_transformers_generate(family: str, overrides: dict, tmp_path) -> None:
    original, model = models(family, tmp_path, **overrides)
    ids, mask = prompts()
    # eos 1 early enough for some rows: each row must stop on its own, the others go on
    want = original.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                             eos_token_id=1)[:, ids.shape[1]:]
    stream = model.stream_generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=1)
    got = torch.stack(list(stream), dim=1)
    assert torch.equal(got, want)


def test_each_row_stops_on_its_own_eos_and_then_yields_pad(tmp_path) -> None:
    _, model = models("llama", tmp_path)
    ids, mask = prompts()
    free = torch.stack(list(model.stream_generate(ids, attention_mask=mask, max_new_tokens=12)), dim=1)
    eos = int(free[0, 2])  # row 0's third token: make it that row's eos
    steps = torch.stack(list(model.stream_generate(ids, attention_mask=mask, max_new_tokens=12,
                                                    eos_token_id=[eos, 10**6])), dim=1)
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in free]
    for row, stop in enumerate(first):
        if stop is None:
            assert torch.equal(steps[row], free[row][: steps.shape[1]])
        else:
            assert torch.equal(steps[row, : stop + 1], free[row, : stop + 1])
            assert (steps[row, stop + 1:] == 0).all()  # the pad id


def test_stop_strings_spanning_two_tokens_stop_exactly_as_transformers(tmp_path) -> None:
    tok = tokenizer()
    original, model = models("llama", tmp_path)
    text = ["hello wor", "the quick"]
    free = "".join(piece[0] for piece in model.stream_generate(text=text, tokenizer=tok, max_new_tokens=12))
    ids = [t for t in tok(text[0])["input_ids"]]
    gen = model.stream_generate(text=text[:1], tokenizer=tok, max_new_tokens=12)
    pieces = [p[0] for p in gen]
    assert "".join(pieces) == free
    cut = next(i for i in range(1, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[i := cut][-1] + pieces[i + 1][0]  # the last character of one, the first of the next
    assert stop not in pieces[i] and stop not in pieces[i + 1]
    got = [p[0] for p in model.stream_generate(text=text[:1], tokenizer=tok, max_new_tokens=12, stop=stop)]
    encoded = tok(text[:1], return_tensors="pt")
    want = original.generate(**encoded, max_new_tokens=12, do_sample=False, stop_strings=stop, tokenizer=tok,
                             pad_token_id=0)
    assert "".join(got) == tok.decode(want[0, len(ids):], skip_special_tokens=True)
    assert "".join(got).endswith(pieces[i + 1]) and stop in "".join(got)


def test_text_is_released_in_whole_characters(tmp_path, monkeypatch) -> None:
    """The model is scripted to emit the tokens of a text whose characters span several
    byte-level tokens: no piece holds half a character, and the pieces join to the text."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    tok = tokenizer()
    _, model = models("llama", tmp_path)
    text = "日本語のテキスト 🙂 ünïcödé"
    script = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in script)  # some token is part of a character
    step = {"n": 0}

    def scripted(input_ids=None, **kwargs):
        logits = torch.zeros(input_ids.shape[0], 1, VOCAB)
        logits[:, -1, script[min(step["n"], len(script) - 1)]] = 1.0
        step["n"] += 1
        return CausalLMOutputWithPast(logits=logits)

    monkeypatch.setattr(model, "forward", scripted)
    pieces = [p[0] for p in model.stream_generate(torch.tensor([[5, 6]]), tokenizer=tok,
                                                   max_new_tokens=len(script), eos_token_id=10**6)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a step that ended mid-character released nothing


def test_sampling_with_a_seed_is_reproducible(tmp_path) -> None:
    _, model = models("llama", tmp_path)
    ids, mask = prompts()
    args = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": True, "temperature": 1.3, "top_k": 50,
            "top_p": 0.9, "eos_token_id": 10**6}
    runs = [torch.stack(list(model.stream_generate(ids, seed=s, **args))) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_closing_after_two_tokens_frees_the_cache_and_leaves_no_thread(tmp_path, monkeypatch) -> None:
    import reference.modeling.generate as generate

    caches: list[weakref.ref] = []

    class Recorded(generate.DynamicCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self))

    monkeypatch.setattr(generate, "DynamicCache", Recorded)
    _, model = models("llama", tmp_path)
    threads = threading.active_count()
    gen = model.stream_generate(prompts()[0], max_new_tokens=50, eos_token_id=10**6)
    next(gen), next(gen)
    assert caches and caches[0]() is not None and threading.active_count() == threads
    gen.close()
    gc.collect()
    assert caches[0]() is None and gen.gi_frame is None


def test_an_error_in_a_forward_reaches_the_loop(tmp_path, monkeypatch) -> None:
    _, model = models("llama", tmp_path)
    calls = {"n": 0}
    forward = model.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom in step 3")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    seen = []
    with pytest.raises(RuntimeError, match="boom in step 3"):
        for token in model.stream_generate(prompts()[0], max_new_tokens=10, eos_token_id=10**6):
            seen.append(token)
    assert len(seen) == 2


def test_transformers_generate_is_the_reference_here_too(tmp_path) -> None:
    """The stream and the unified model's own generate() (transformers' GenerationMixin) agree."""
    _, model = models("llama", tmp_path)
    ids, mask = prompts()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=1)[:, ids.shape[1]:]
    stream = model.stream_generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=1)
    got = torch.stack(list(stream), dim=1)
    assert torch.equal(got, want)


def test_eos_comes_from_generation_config_by_default(tmp_path) -> None:
    original, _ = models("llama", tmp_path)
    ids, mask = prompts()
    free = original.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[:, ids.shape[1]:]
    eos = int(free[1, 3])
    original.generation_config.eos_token_id = eos  # saved as generation_config.json
    original.save_pretrained(tmp_path / "with-eos")
    model = UnifiedForCausalLM.from_pretrained(tmp_path / "with-eos")
    assert model.generation_config.eos_token_id == eos
    want = original.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0)[:, ids.shape[1]:]
    got = torch.stack(list(model.stream_generate(ids, attention_mask=mask, max_new_tokens=12)), dim=1)
    assert torch.equal(got, want) and (got == eos).any()
