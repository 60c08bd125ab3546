"""ChannelLossTrainer: a real transformers Trainer, gradient accumulation 4, packed rows."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from reference.train.data import ChannelCollator, Sample
from reference.train.hf_trainer import record_from_logs

NAMES = ["code", "math", "web"]
BATCH, ACCUM, STEPS = 2, 4, 3  # one epoch of 24 samples is exactly 3 optimizer steps
# References computed by transformers in float32 agree to float32 rounding (assert_close's
# float32 defaults); our float64 sums add up tighter, checked at the float64 defaults.
FP32 = {"rtol": 1.3e-6, "atol": 1e-5}


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    """24 samples of unequal lengths; every third one packed (two channels in one row)."""
    rng = random.Random(0)
    out = []
    for i in range(BATCH * ACCUM * STEPS):
        n = rng.randint(5, 17)
        ids = [rng.randrange(89) for _ in range(n)]
        labels = [t if rng.random() > 0.2 else -100 for t in ids]
        channels = [NAMES[i % 3]] * n
        if i % 3 == 2:
            cut = n // 2
            channels[cut:] = [NAMES[(i + 1) % 3]] * (n - cut)
            labels[cut] = -100  # no loss term across the packing boundary
        out.append(Sample(input_ids=ids, labels=labels, channels=channels))
    return out


@pytest.fixture(scope="module")
def model():
    from reference.tiny import tiny_model

    return tiny_model("llama", vocab_size=89, max_position_embeddings=32)


def train(model, samples, tmp_path, *, channels: bool, logging_steps: int):
    """Train a copy of `model` for one epoch; return the trainer."""
    from transformers import Trainer, TrainingArguments

    from reference.train.hf_trainer import ChannelLossTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        logging_steps=logging_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        seed=0,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    ids = {n: i for i, n in enumerate(NAMES)}
    collator = ChannelCollator(channel_id=ids.__getitem__)
    if channels:
        cls, kwargs, collate = ChannelLossTrainer, {"channel_names": NAMES}, collator
    else:  # the plain Trainer's model must not receive channel_ids
        cls, kwargs = Trainer, {}

        def collate(rows: list[Sample]) -> dict[str, torch.Tensor]:
            return {k: v for k, v in collator(rows).items() if k != "channel_ids"}

    trainer = cls(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=samples,
        data_collator=collate,
        **kwargs,
    )
    trainer.train()
    return trainer


def training_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


def channels_of(log: dict) -> dict[str, tuple[float, int]]:
    return {k[5:]: (v, log["tokens/" + k[5:]]) for k, v in log.items() if k.startswith("loss/")}


def test_trainer_logs_channel_loss_that_adds_up_to_its_own_loss(model, samples, tmp_path):
    plain = training_logs(train(model, samples, tmp_path / "p", channels=False, logging_steps=1))
    per_step = training_logs(train(model, samples, tmp_path / "s", channels=True, logging_steps=1))
    trainer = train(model, samples, tmp_path / "w", channels=True, logging_steps=STEPS)
    window = training_logs(trainer)

    # Logging every step, the global loss is the Trainer's own (num_items_in_batch) loss.
    assert [log["step"] for log in per_step] == [log["step"] for log in plain] == [1, 2, 3]
    for ours, theirs in zip(per_step, plain, strict=True):
        torch.testing.assert_close(ours["loss"], theirs["loss"], **FP32)
        assert "tokens" not in theirs
    for log in [*per_step, *window]:
        channels = channels_of(log)
        assert sum(n for _, n in channels.values()) == log["tokens"]
        weighted = sum(loss * n for loss, n in channels.values())
        torch.testing.assert_close(weighted / log["tokens"], log["loss"])

    # One window over the epoch: every token of the data, once, and the token-weighted
    # combination of the per-step numbers (divided once, not a mean of means).
    (whole,) = window
    expected: dict[str, int] = {}
    for s in samples:
        for label, channel in zip(s.labels[1:], s.channels[1:], strict=True):
            expected[channel] = expected.get(channel, 0) + (label != -100)
    assert {c: n for c, (_, n) in channels_of(whole).items()} == expected
    assert whole["tokens"] == sum(log["tokens"] for log in per_step)
    weighted = sum(log["loss"] * log["tokens"] for log in per_step) / whole["tokens"]
    torch.testing.assert_close(whole["loss"], weighted)
    for name, (loss, n) in channels_of(whole).items():
        steps = [channels_of(log)[name] for log in per_step if name in channels_of(log)]
        torch.testing.assert_close(loss, sum(x * k for x, k in steps) / n)

    # Evaluation goes through compute_loss too, but stays out of the training window.
    metrics = trainer.evaluate(samples[:4])
    assert math.isfinite(metrics["eval_loss"]) and not any("/" in k for k in metrics)
    assert trainer.channel_loss.reduce().tokens == 0


def test_a_window_without_tokens_is_logged_as_null_not_nan() -> None:
    """NaN is not JSON: a strict reader (jq, a browser) must be able to read every line."""
    logs = {"loss": float("nan"), "tokens": 0}
    line = json.dumps(record_from_logs(logs, 7), allow_nan=False)

    def strict(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    assert json.loads(line, parse_constant=strict) == {"step": 7, "loss": None, "tokens": 0, "channels": {}}
