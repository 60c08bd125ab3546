"""Step time with and without channel loss: same model, same batches, in one run.

    python benchmarks/bench_channel_loss.py [--steps N] [--repeats R] [--threads T]

Prints a markdown table with two rows. "bare step": forward, backward and AdamW over the
accumulation steps, the two variants alternating step by step on copies of one model, so
that load on the machine hits both alike. "HF Trainer": `Trainer` against
`ChannelLossTrainer`, alternating whole runs R times; each run's first steps are warm-up.
Channel loss is logged every step, its worst case (one names sync and one reduction a step).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from reference.train.accumulator import ChannelLossAccumulator, causal_lm_token_losses
from reference.train.data import ChannelCollator, Sample
from reference.train.hf_trainer import CHANNEL_IDS, ChannelLossTrainer

SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
BATCH, SEQ, ACCUM, WARMUP = 4, 128, 2, 2
NAMES = [f"ch{i}" for i in range(8)]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, optimizer, logging)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, **kwargs) -> None:
        # Trainer logs after on_step_end: fold the log (where channel loss reduces) into the step.
        if self.times and "loss" in (kwargs.get("logs") or {}):
            self.times[-1] = time.perf_counter() - self._start


def samples(n: int) -> list[Sample]:
    """Full-length rows, packed from two samples of different channels."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = [rng.randrange(SHAPE["vocab_size"]) for _ in range(SEQ)]
        cut = rng.randrange(1, SEQ)
        a, b = rng.sample(NAMES, 2)
        labels = ids[:cut] + [-100] + ids[cut + 1 :]
        out.append(Sample(input_ids=ids, labels=labels, channels=[a] * cut + [b] * (SEQ - cut)))
    return out


def bare_steps(model, data, steps: int) -> dict[bool, list[float]]:
    """Per-step seconds of a plain loop, without and with channel loss, alternating."""
    ids = {n: i for i, n in enumerate(NAMES)}
    collator = ChannelCollator(channel_id=ids.__getitem__)
    batches = [collator(data[i : i + BATCH]) for i in range(0, BATCH * ACCUM, BATCH)]
    models = {key: copy.deepcopy(model).train() for key in (False, True)}
    optimizers = {key: torch.optim.AdamW(m.parameters(), lr=1e-4) for key, m in models.items()}
    accumulator = ChannelLossAccumulator(NAMES)
    times: dict[bool, list[float]] = {False: [], True: []}
    for step in range(steps + WARMUP):
        for channels in (False, True) if step % 2 else (True, False):
            model, optimizer = models[channels], optimizers[channels]
            start = time.perf_counter()
            n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            for batch in batches:
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                    num_items_in_batch=n_items,
                )
                out.loss.backward()
                if channels:
                    with torch.no_grad():
                        accumulator.add(
                            *causal_lm_token_losses(out.logits.detach(), batch["labels"], batch[CHANNEL_IDS])
                        )
            optimizer.step()
            optimizer.zero_grad()
            if channels:
                accumulator.reduce()
            if step >= WARMUP:
                times[channels].append(time.perf_counter() - start)
    return times


def trainer_run(model, data, channels: bool, steps: int, out: Path) -> list[float]:
    """Per-step seconds of one Trainer run, warm-up steps dropped."""
    ids = {n: i for i, n in enumerate(NAMES)}
    collator = ChannelCollator(channel_id=ids.__getitem__)
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=steps + WARMUP,
        logging_steps=1,
        seed=0,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    if channels:
        trainer = ChannelLossTrainer(
            model=copy.deepcopy(model),
            args=args,
            train_dataset=data,
            data_collator=collator,
            channel_names=NAMES,
            callbacks=[timer],
        )
    else:
        trainer = Trainer(
            model=copy.deepcopy(model),
            args=args,
            train_dataset=data,
            data_collator=lambda rows: {k: v for k, v in collator(rows).items() if k != CHANNEL_IDS},
            callbacks=[timer],
        )
    trainer.remove_callback(PrinterCallback)  # printing every log is not what we measure
    trainer.train()
    return timer.times[WARMUP:]


def row(name: str, times: dict[bool, list[float]]) -> str:
    """One markdown row: mean +- stdev in ms without and with channel loss, and the overhead
    of the means and of the medians (the median shrugs off other load on a shared machine)."""
    cells = [
        f"{1000 * statistics.mean(times[k]):.1f} ± {1000 * statistics.stdev(times[k]):.1f}"
        for k in (False, True)
    ]
    mean = 100 * (statistics.mean(times[True]) / statistics.mean(times[False]) - 1)
    median = 100 * (statistics.median(times[True]) / statistics.median(times[False]) - 1)
    return f"| {name} | {cells[0]} | {cells[1]} | {mean:+.1f} % | {median:+.1f} % | {len(times[False])} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant and row")
    parser.add_argument("--repeats", type=int, default=12, help="Trainer runs per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier)")
    args, _ = parser.parse_known_args(argv)  # nox -s bench passes the same args to every bench

    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    per_run = -(-args.steps // args.repeats)
    data = samples(BATCH * ACCUM * (per_run + WARMUP))
    bare = bare_steps(model, data, args.steps)
    trainer: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for channels in (False, True):
                trainer[channels] += trainer_run(model, data, channels, per_run, Path(tmp))

    print(
        f"CPU, {torch.get_num_threads()} threads; Llama {SHAPE['num_hidden_layers']} layers x"
        f" {SHAPE['hidden_size']}, vocab {SHAPE['vocab_size']}; micro-batch {BATCH} x {SEQ}"
        f" tokens, grad accum {ACCUM}, {len(NAMES)} channels, logged every step\n"
    )
    print(
        "| loop | without channel loss (ms) | with channel loss (ms) | overhead, means"
        " | overhead, medians | steps |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(row("bare step (alternating steps)", bare))
    print(row("HF Trainer (alternating runs)", trainer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
