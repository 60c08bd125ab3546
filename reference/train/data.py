"""SFT samples with a channel, read from JSONL, and the collator that pads them.

One JSON object a line:

    {"input_ids": [1, 5, 9], "labels": [-100, 5, 9], "channel": "web"}

- `input_ids`: token ids; or `text`, tokenized with the model directory's tokenizer.
- `labels`: optional, default `input_ids`; -100 masks a token out of the loss.
- the channel field (`channel` unless `--channel-field` says otherwise): one name for the
  sample, or, for a packed sample, a list with one name per token. A packed sample should
  set the label of each inner sample's first token to -100, as transformers' padding-free
  collator does, so that no loss term predicts across a boundary.

With `random_channels=K` every sample gets a channel `ch0..ch{K-1}` drawn with a seeded RNG
in file order (the same on every rank), whatever its channel field says.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from reference.errors import InputError
from reference.jsonl import line_error, read_objects
from reference.train.accumulator import IGNORE_INDEX, NO_CHANNEL


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One training row: token ids, labels and a channel name per token."""

    input_ids: list[int]
    labels: list[int]
    channels: list[str]


def _int_list(value: object, path: Path, lineno: int, name: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise line_error(path, lineno, f"field '{name}' must be a list of integers")
    return value


def _channels(value: object, n: int, path: Path, lineno: int, name: str) -> list[str]:
    if isinstance(value, str) and value:
        return [value] * n
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        if len(value) != n:
            raise line_error(path, lineno, f"field '{name}' has {len(value)} names for {n} tokens")
        return value
    raise line_error(path, lineno, f"field '{name}' must be a non-empty name or a list of names")


def load_samples(
    path: Path,
    *,
    channel_field: str = "channel",
    random_channels: int = 0,
    seed: int = 0,
    max_length: int | None = None,
    tokenize: Callable[[str], list[int]] | None = None,
) -> list[Sample]:
    """Read and check every line of `path`; raise InputError naming the file, line and field."""
    rng = random.Random(seed)
    samples = []
    for lineno, row in read_objects(path, "one sample a line"):
        if "input_ids" in row:
            ids = _int_list(row["input_ids"], path, lineno, "input_ids")
        elif "text" in row and isinstance(row["text"], str):
            if tokenize is None:
                raise line_error(path, lineno, "field 'text' needs a tokenizer in the model dir")
            ids = tokenize(row["text"])
        else:
            raise line_error(path, lineno, "missing field 'input_ids' (or 'text')")
        if not ids:
            raise line_error(path, lineno, "empty sample")
        labels = _int_list(row.get("labels", ids), path, lineno, "labels")
        if len(labels) != len(ids):
            raise line_error(path, lineno, f"'labels' has {len(labels)} ids for {len(ids)} tokens")
        if random_channels:
            channels = [f"ch{rng.randrange(random_channels)}"] * len(ids)
        elif channel_field not in row:
            raise line_error(path, lineno, f"missing channel field '{channel_field}'")
        else:
            channels = _channels(row[channel_field], len(ids), path, lineno, channel_field)
        cut = slice(0, max_length)
        samples.append(Sample(input_ids=ids[cut], labels=labels[cut], channels=channels[cut]))
    if not samples:
        raise InputError(f"{path}: no samples")
    return samples


@dataclass(frozen=True)
class ChannelCollator:
    """Pads a list of samples to (B, T) tensors, with `channel_ids` for the channel loss."""

    channel_id: Callable[[str], int]
    pad_token_id: int = 0

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Right-pad: pads get attention 0, label -100 and no channel."""
        length = max(len(s.input_ids) for s in samples)
        shape = (len(samples), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        channel_ids = torch.full(shape, NO_CHANNEL, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            input_ids[i, :n] = torch.tensor(s.input_ids)
            labels[i, :n] = torch.tensor(s.labels)
            channel_ids[i, :n] = torch.tensor([self.channel_id(c) for c in s.channels])
            attention_mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "channel_ids": channel_ids,
        }
