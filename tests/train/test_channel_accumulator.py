"""The channel accumulator against transformers' own causal-LM loss, in one process."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.train.accumulator import ChannelLossAccumulator, causal_lm_token_losses

# References computed by transformers in float32 agree to float32 rounding (assert_close's
# float32 defaults); our float64 sums add up tighter, checked at the float64 defaults.
FP32 = {"rtol": 1.3e-6, "atol": 1e-5}


def check_adds_up(report) -> None:
    """sum_c(N_c * L_c) / sum_c N_c is the global loss and sum_c N_c its token count."""
    tokens = sum(s.tokens for s in report.channels.values())
    assert tokens == report.tokens
    weighted = sum(s.loss * s.tokens for s in report.channels.values())
    torch.testing.assert_close(weighted / tokens, report.loss)


def masked_to(labels: torch.Tensor, channel_ids: torch.Tensor, c: int) -> torch.Tensor:
    """Labels of channel `c` only: transformers' loss restricted to one channel."""
    return labels.masked_fill(channel_ids != c, -100)


def tiny_llama():
    from reference.tiny import tiny_model

    return tiny_model("llama", vocab_size=97)


def test_llama_micro_batches_match_transformers_loss() -> None:
    """Packed rows (a channel per token) over micro-batches of unequal token counts."""
    model = tiny_llama()
    acc = ChannelLossAccumulator(["web", "code", "math"])
    g = torch.Generator().manual_seed(1)
    batches = []
    for rows, length in [(2, 16), (3, 9), (1, 20)]:
        input_ids = torch.randint(0, 97, (rows, length), generator=g)
        labels = input_ids.clone()
        labels[torch.rand(rows, length, generator=g) < 0.25] = -100
        channel_ids = torch.randint(0, 3, (rows, length), generator=g)  # packed: per token
        batches.append((input_ids, labels, channel_ids))
        with torch.no_grad():
            logits = model(input_ids).logits
        acc.add(*causal_lm_token_losses(logits, labels, channel_ids))
    report = acc.reduce()

    def hf_sum_count(labels_of) -> tuple[float, int]:
        total, count = 0.0, 0
        for input_ids, labels, channel_ids in batches:
            mine = labels_of(labels, channel_ids)
            n = int((mine[:, 1:] != -100).sum())
            if n:
                with torch.no_grad():
                    total += model(input_ids, labels=mine).loss.item() * n  # mean * count
                count += n
        return total, count

    total, count = hf_sum_count(lambda labels, _: labels)
    assert report.tokens == count
    torch.testing.assert_close(report.loss, total / count, **FP32)
    for c, name in enumerate(["web", "code", "math"]):
        total, count = hf_sum_count(lambda labels, ids, c=c: masked_to(labels, ids, c))
        assert report.channels[name].tokens == count
        torch.testing.assert_close(report.channels[name].loss, total / count, **FP32)
    check_adds_up(report)


@st.composite
def micro_batches(draw):
    """Random micro-batches: logits, labels with a random ignore mask, channel per token."""
    vocab = draw(st.integers(2, 11))
    n_channels = draw(st.integers(1, 5))
    per_row = draw(st.booleans())  # one channel a row, or packed (one a token)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        rows, length = draw(st.integers(1, 3)), draw(st.integers(1, 7))
        logits = torch.randn(rows, length, vocab, generator=g) * 3
        labels = torch.randint(0, vocab, (rows, length), generator=g)
        labels[torch.rand(rows, length, generator=g) < draw(st.floats(0, 1))] = -100
        if per_row:
            channel_ids = torch.randint(0, n_channels, (rows, 1), generator=g).expand(-1, length)
        else:
            channel_ids = torch.randint(0, n_channels, (rows, length), generator=g)
        batches.append((logits, labels, channel_ids))
    chunk = draw(st.integers(1, 40))  # logits per chunk: rows go through a few at a time
    return n_channels, chunk, batches


@settings(max_examples=60, deadline=None)
@given(micro_batches())
def test_random_channels_and_masks_match_grad_accum_loss(case) -> None:
    """transformers' gradient-accumulation loss: sum of per-batch sums / num_items_in_batch."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    n_channels, chunk, batches = case
    names = [f"ch{c}" for c in range(n_channels)]
    acc = ChannelLossAccumulator(names)
    for logits, labels, channel_ids in batches:
        acc.add(*causal_lm_token_losses(logits, labels, channel_ids, chunk_elements=chunk))
    report = acc.reduce()

    def hf(labels_of) -> tuple[float, int]:
        count = sum(int((labels_of(lb, ch)[:, 1:] != -100).sum()) for _, lb, ch in batches)
        loss = sum(
            ForCausalLMLoss(lg, labels_of(lb, ch), lg.shape[-1], num_items_in_batch=count)
            for lg, lb, ch in batches
        )
        return float(loss) if count else math.nan, count

    loss, count = hf(lambda labels, _: labels)
    assert report.tokens == count
    if count:
        torch.testing.assert_close(report.loss, loss, **FP32)
        check_adds_up(report)
    else:
        assert math.isnan(report.loss) and report.channels == {}
    for c, name in enumerate(names):
        loss, count = hf(lambda labels, ids, c=c: masked_to(labels, ids, c))
        if count:
            assert report.channels[name].tokens == count
            torch.testing.assert_close(report.channels[name].loss, loss, **FP32)
        else:
            assert name not in report.channels  # nothing to divide: not reported


def test_reduce_divides_once_per_window_and_resets() -> None:
    """Two windows: each reports only its own tokens; channel names stay registered."""
    acc = ChannelLossAccumulator()
    a, b = acc.channel_id("b-chan"), acc.channel_id("a-chan")
    ones = torch.ones(4, dtype=torch.bool)
    acc.add(torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([a, a, b, b]), ones)
    first = acc.reduce()
    assert list(first.channels) == ["a-chan", "b-chan"]  # sorted, not in order of sight
    assert first.to_json() == {
        "loss": 4.0,
        "tokens": 4,
        "channels": {"a-chan": {"loss": 6.5, "tokens": 2}, "b-chan": {"loss": 1.5, "tokens": 2}},
    }
    acc.add(torch.tensor([5.0, 7.0]), torch.tensor([a, -1]), torch.tensor([True, False]))
    second = acc.reduce()
    assert second.to_json() == {"loss": 5.0, "tokens": 1, "channels": {"b-chan": {"loss": 5.0, "tokens": 1}}}
    assert acc.names == ["b-chan", "a-chan"]


def test_counted_token_without_a_channel_is_an_error() -> None:
    """A token in the loss but in no channel would break the sum; it must not vanish."""
    acc = ChannelLossAccumulator(["web"])
    with pytest.raises((IndexError, RuntimeError)):
        acc.add(torch.tensor([1.0]), torch.tensor([-1]), torch.tensor([True]))
    with pytest.raises(ValueError, match="non-empty"):
        acc.channel_id("")
