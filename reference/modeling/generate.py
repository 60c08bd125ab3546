"""A streaming generator: a plain Python generator over the model's KV cache (no thread, no
queue), so that closing it frees the cache at once and an exception inside reaches the loop.

Greedy decoding is token for token what transformers' `generate()` gives (same positions from
the attention mask, same handling of finished rows); sampling (temperature, top-k, top-p, in
transformers' order) draws from a generator seeded per call, so a seed reproduces a run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache


def _eos_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """eos ids: as given, else the model's generation_config.json, else its config."""
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _pad_id(model: Any, tokenizer: Any, eos: list[int]) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        pad = getattr(source, "pad_token_id", None) if source is not None else None
        if pad is not None:
            return int(pad)
    return eos[0] if eos else 0


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator) -> torch.Tensor:
    """One token per row from (B, V) logits, filtered as transformers' warpers do."""
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Text:
    """Per row: the text generated so far, released only when it ends on whole characters (a
    byte-level token can be half of a multi-byte character, which decodes to U+FFFD)."""

    def __init__(self, tokenizer: Any, rows: int) -> None:
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.ids[row], skip_special_tokens=True)

    def new(self, row: int, token: int | None) -> str:
        if token is not None:
            self.ids[row].append(token)
        text = self.text(row)
        if text.endswith("\ufffd") and token is not None:
            return ""  # wait for the rest of the character
        out, self.sent[row] = text[self.sent[row]:], len(text)
        return out


def stream_generate(
    model: Any,
    input_ids: torch.Tensor | None = None,
    *,
    text: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    eos_token_id: int | Sequence[int] | None = None,
    stop: str | Sequence[str] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Iterator[torch.Tensor | list[str]]:
    """Yield, after each step, the new token of every row (a tensor [batch]) or, given a
    tokenizer, the new text of every row (a list of str). A row stops on its own eos or stop
    string (the stop string is part of its text, as transformers does) and then yields the pad
    id, or ""; the generator returns when every row has stopped or after max_new_tokens."""
    if (input_ids is None) == (text is None):
        raise ValueError("stream_generate: give input_ids or text (with a tokenizer)")
    if (text is not None or stop) and tokenizer is None:
        raise ValueError("stream_generate: text and stop strings need a tokenizer")
    if text is not None:
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation appends on the right
        try:
            batch = tokenizer([text] if isinstance(text, str) else list(text), return_tensors="pt",
                              padding=True)
        finally:
            tokenizer.padding_side = side
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    device = model.embed.weight.device if hasattr(model, "embed") else model.device
    input_ids = input_ids.to(device)
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    eos = _eos_ids(model, eos_token_id)
    pad = _pad_id(model, tokenizer, eos)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    generator = torch.Generator(device="cpu")
    if do_sample:
        generator.manual_seed(seed if seed is not None else torch.seed())
    texts = _Text(tokenizer, input_ids.shape[0]) if tokenizer is not None else None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    cache = DynamicCache()
    ids = input_ids
    try:
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -ids.shape[1]:]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1].to(device)  # (B, V)
            if do_sample:
                token = _sample(logits, temperature, top_k, top_p, generator).to(device)
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(done, pad)
            was_done = done.clone()
            if eos:
                done = done | torch.isin(token, torch.tensor(eos, device=device))
            if texts is None:
                yield token
            else:
                out = []
                for row, tok in enumerate(token.tolist()):
                    if was_done[row]:
                        out.append("")
                        continue
                    piece = texts.new(row, tok)
                    if stops and any(s in texts.text(row) for s in stops):
                        done[row] = True
                    out.append(piece)
                yield out
            if bool(done.all()):
                return
            ids = token[:, None]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    finally:
        del cache  # freed when the consumer closes the generator or breaks out of its loop
