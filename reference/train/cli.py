"""`reference train MODEL DATA OUT`: SFT with per-channel loss curves (cheap to import)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from reference.errors import require

TRAIN_EXTRA = ("tensorboard", "matplotlib", "accelerate")  # what `pip install 'reference[train]'` adds


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `train` subcommand's arguments."""
    parser.add_argument("model", type=Path, help="local HF model directory (from_pretrained)")
    parser.add_argument("data", type=Path, help="JSONL samples: input_ids or text, channel")
    parser.add_argument("out", type=Path, help="output dir: channel_loss.jsonl/.png, tensorboard/")
    parser.add_argument("--channel-field", default="channel", help="sample field naming the channel")
    parser.add_argument(
        "--random-channels",
        type=_positive,
        default=0,
        metavar="K",
        help="give each sample a seeded random channel ch0..ch{K-1}, ignoring --channel-field",
    )
    parser.add_argument("--grad-accum", type=_positive, default=1, metavar="G", help="micro-batches a step")
    parser.add_argument("--max-steps", type=_positive, default=20, metavar="S", help="optimizer steps")
    parser.add_argument("--log-every", type=_positive, default=1, metavar="L", help="steps a log window")
    parser.add_argument("--batch-size", type=_positive, default=4, help="micro-batch per rank")
    parser.add_argument("--lr", type=float, default=1e-4, help="constant learning rate")
    parser.add_argument("--max-length", type=_positive, default=1024, help="truncate samples")
    parser.add_argument("--seed", type=int, default=0, help="training and --random-channels seed")


def run(args: argparse.Namespace) -> int:
    """Run the SFT with channel loss; under torchrun (WORLD_SIZE > 1) set up the process group first."""
    require("train", *TRAIN_EXTRA)
    import torch
    import torch.distributed as dist

    from reference.train.sft import SftConfig, run_sft

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        records = run_sft(
            SftConfig(
                model=args.model,
                data=args.data,
                out=args.out,
                channel_field=args.channel_field,
                random_channels=args.random_channels,
                grad_accum=args.grad_accum,
                max_steps=args.max_steps,
                log_every=args.log_every,
                batch_size=args.batch_size,
                lr=args.lr,
                max_length=args.max_length,
                seed=args.seed,
            )
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if records:
        print(summary(records[-1], args.out))
    return 0


def summary(last: dict, out: Path) -> str:
    """The line printed after training: the last window's loss (none if it had no tokens)."""
    loss = "-" if last["loss"] is None else f"{last['loss']:.4f}"
    return (f"step {last['step']}: loss {loss} over {last['tokens']} tokens; wrote "
            f"{out / 'channel_loss.jsonl'}, {out / 'channel_loss.png'}")
