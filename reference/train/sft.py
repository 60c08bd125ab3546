"""A small SFT run with channel loss, on the HF Trainer.

Writes `OUT/channel_loss.jsonl` (one line per logged step), TensorBoard events under
`OUT/tensorboard`, and `OUT/channel_loss.png`. Runs alone or under `torchrun`; the process
group, when there is one, must be initialised by the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reference.errors import InputError
from reference.train.data import ChannelCollator, load_samples
from reference.train.hf_trainer import ChannelLossJsonlCallback, ChannelLossTrainer
from reference.train.plot import plot_channel_loss

JSONL_NAME = "channel_loss.jsonl"
PNG_NAME = "channel_loss.png"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True, kw_only=True)
class SftConfig:
    """What `reference train` needs; see `reference.train.data` for the sample format."""

    model: Path
    data: Path
    out: Path
    channel_field: str = "channel"
    random_channels: int = 0
    grad_accum: int = 1
    max_steps: int = 20
    log_every: int = 1
    batch_size: int = 4
    lr: float = 1e-4
    max_length: int = 1024
    seed: int = 0


def _tokenizer_fn(model_dir: Path) -> Any:
    """A tokenize function that loads the model dir's tokenizer on first use only."""
    loaded: list[Any] = []

    def tokenize(text: str) -> list[int]:
        if not loaded:
            from transformers import AutoTokenizer

            try:
                loaded.append(AutoTokenizer.from_pretrained(model_dir))
            except (OSError, ValueError) as e:
                raise InputError(f"{model_dir}: samples have 'text' but no tokenizer loads: {e}") from None
        return loaded[0](text)["input_ids"]

    return tokenize


def run_sft(cfg: SftConfig) -> list[dict[str, Any]]:
    """Train, log the channel loss to every sink, and return the JSONL records (main rank)."""
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.integrations import TensorBoardCallback

    import reference.modeling  # noqa: F401  (registers the unified format with AutoModelForCausalLM)

    if not (cfg.model / "config.json").is_file():
        raise InputError(f"{cfg.model}: not a model directory (no config.json)")
    samples = load_samples(
        cfg.data,
        channel_field=cfg.channel_field,
        random_channels=cfg.random_channels,
        seed=cfg.seed,
        max_length=cfg.max_length,
        tokenize=_tokenizer_fn(cfg.model),
    )
    names = sorted({c for s in samples for c in s.channels})
    ids = {name: i for i, name in enumerate(names)}  # channel id i is names[i]
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    main = not dist.is_initialized() or dist.get_rank() == 0
    cfg.out.mkdir(parents=True, exist_ok=True)
    jsonl = cfg.out / JSONL_NAME
    callbacks: list[Any] = [ChannelLossJsonlCallback(jsonl)]
    if main:
        from torch.utils.tensorboard import SummaryWriter

        jsonl.unlink(missing_ok=True)
        writer = SummaryWriter(log_dir=str(cfg.out / TENSORBOARD_DIR))
        callbacks.append(TensorBoardCallback(tb_writer=writer))

    args = TrainingArguments(
        output_dir=str(cfg.out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps,
        logging_steps=cfg.log_every,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",  # the curves show the channels, not a schedule
        seed=cfg.seed,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,  # keep channel_ids in the batch
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every parameter of a causal LM gets a gradient
    )
    trainer = ChannelLossTrainer(
        model=model,
        args=args,
        train_dataset=samples,
        data_collator=ChannelCollator(channel_id=ids.__getitem__, pad_token_id=pad),
        channel_names=names,
        callbacks=callbacks,
    )
    trainer.train()
    if not main:
        return []
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    plot_channel_loss(records, cfg.out / PNG_NAME)
    return records
