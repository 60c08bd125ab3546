"""`reference train`: input errors, every sink agreeing, and 2 ranks under torchrun.

With learning rate 0 the weights never move, so a logging window that covers the whole
data set must report exactly transformers' loss of the initial model on that data set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
WORDS = [f"w{i}" for i in range(40)]
N_SAMPLES = 32  # one logging window of every test run below covers all of them
# References computed by transformers in float32 agree to float32 rounding (assert_close's
# float32 defaults); our float64 sums add up tighter, checked at the float64 defaults.
FP32 = {"rtol": 1.3e-6, "atol": 1e-5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a tiny word-level tokenizer, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reference.tiny import tiny_model

    path = tmp_path_factory.mktemp("model")
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    tiny_model("llama", vocab_size=64).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Samples of every kind: ids, ids with labels, packed (a channel per token), text;
    channel 'rare' has a single sample, so at most one rank sees it in a window."""
    rng = random.Random(0)
    lines = []
    for i in range(N_SAMPLES):
        n = rng.randint(4, 14)
        ids = [rng.randrange(2, 42) for _ in range(n)]
        channel = "rare" if i == 5 else ["web", "code"][i % 2]
        if i % 4 == 0:
            lines.append({"text": " ".join(WORDS[t - 2] for t in ids), "channel": channel})
        elif i % 4 == 1:
            labels = [-100] * (n // 2) + ids[n // 2 :]  # a prompt masked out of the loss
            lines.append({"input_ids": ids, "labels": labels, "channel": channel})
        elif i % 4 == 2:
            cut = n // 2
            labels = ids[:cut] + [-100] + ids[cut + 1 :]
            names = ["math"] * cut + [channel] * (n - cut)
            lines.append({"input_ids": ids, "labels": labels, "channel": names})
        else:
            lines.append({"input_ids": ids, "channel": channel})
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def parse(*argv: str) -> argparse.Namespace:
    from reference.train import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def expected_window(model_dir: Path, data_file: Path, **load: object) -> dict:
    """transformers' own loss of the unchanged model over the whole data set, per channel."""
    from transformers import AutoModelForCausalLM

    from reference.train.data import load_samples
    from reference.train.sft import _tokenizer_fn

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    samples = load_samples(data_file, tokenize=_tokenizer_fn(model_dir), **load)
    sums: dict[str | None, list[float]] = {}
    for s in samples:
        for name in [None, *set(s.channels)]:
            labels = [t if name in (None, c) else -100 for t, c in zip(s.labels, s.channels, strict=True)]
            count = sum(t != -100 for t in labels[1:])
            if count:
                with torch.no_grad():
                    mean = model(torch.tensor([s.input_ids]), labels=torch.tensor([labels])).loss
                acc = sums.setdefault(name, [0.0, 0])
                acc[0] += mean.item() * count
                acc[1] += count
    return {k: (v[0] / v[1], v[1]) for k, v in sums.items()}


def check_record(record: dict, expected: dict | None = None) -> None:
    """Channels add up to the global loss and tokens; with `expected`, match transformers."""
    channels = record["channels"]
    assert sum(c["tokens"] for c in channels.values()) == record["tokens"]
    weighted = sum(c["loss"] * c["tokens"] for c in channels.values())
    torch.testing.assert_close(weighted / record["tokens"], record["loss"])
    if expected is not None:
        assert sorted(channels) == sorted(k for k in expected if k is not None)
        assert record["tokens"] == expected[None][1]
        torch.testing.assert_close(record["loss"], expected[None][0], **FP32)
        for name, stat in channels.items():
            assert stat["tokens"] == expected[name][1]
            torch.testing.assert_close(stat["loss"], expected[name][0], **FP32)


def test_import_is_cheap() -> None:
    code = (
        "import sys, reference.train.cli\n"
        "heavy = {'torch', 'transformers', 'matplotlib', 'tensorboard'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input_ids": [1, 2], "source": "a"}\n{"input_ids": [1, 2], "source": ', ":2: not valid JSON"),
        ('{"input_ids": [1, 2, 3]}', ":1: missing channel field 'source'"),
        ('{"input_ids": [1, "x"], "source": "a"}', ":1: field 'input_ids' must be a list of integers"),
        ('{"input_ids": [1, 2], "labels": [1], "source": "a"}', ":1: 'labels' has 1 ids for 2 tokens"),
        ('{"input_ids": [1, 2], "source": ["a"]}', ":1: field 'source' has 1 names for 2 tokens"),
    ],
)
def test_bad_data_is_one_clear_line(model_dir, tmp_path, line, message) -> None:
    from reference.train import cli

    data = tmp_path / "bad.jsonl"
    data.write_text(line)
    with pytest.raises(InputError) as e:
        cli.run(parse(model_dir, data, tmp_path / "out", "--channel-field", "source"))
    assert str(e.value).startswith(str(data) + message) and "\n" not in str(e.value)


def test_missing_paths_are_one_clear_line(model_dir, data_file, tmp_path) -> None:
    from reference.train import cli

    with pytest.raises(InputError, match="no such data file"):
        cli.run(parse(model_dir, tmp_path / "none.jsonl", tmp_path / "out"))
    with pytest.raises(InputError, match=r"not a model directory \(no config.json\)"):
        cli.run(parse(tmp_path, data_file, tmp_path / "out"))


def test_one_process_jsonl_tensorboard_png_agree(model_dir, data_file, tmp_path) -> None:
    """Random channels (the exercise), gradient accumulation 2, one window per epoch."""
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reference.train import cli

    out = tmp_path / "out"
    argv = ["--random-channels", "3", "--grad-accum", "2", "--batch-size", "4"]
    argv += ["--log-every", "4", "--max-steps", "8", "--lr", "0"]
    assert cli.run(parse(model_dir, data_file, out, *argv)) == 0

    records = [json.loads(x) for x in (out / "channel_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    expected = expected_window(model_dir, data_file, random_channels=3)
    assert set(expected) - {None} <= {"ch0", "ch1", "ch2"}
    for record in records:
        check_record(record, expected)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars("train/" + tag)]

    def logged(get) -> list[tuple[int, float]]:
        return [(r["step"], float(get(r))) for r in records]

    # TensorBoard stores float32; the values are the ones the JSONL got, from the same log().
    torch.testing.assert_close(scalars("loss"), logged(lambda r: r["loss"]), **FP32)
    torch.testing.assert_close(scalars("tokens"), logged(lambda r: r["tokens"]), **FP32)
    for name in records[0]["channels"]:
        torch.testing.assert_close(
            scalars(f"loss/{name}"), logged(lambda r, n=name: r["channels"][n]["loss"]), **FP32
        )

    image = imread(out / "channel_loss.png")
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # curves drawn, not a blank canvas


def test_torchrun_two_ranks(model_dir, data_file, tmp_path, port) -> None:
    """2 gloo ranks x gradient accumulation 4 x micro-batch 2 x 2 steps = the data set."""
    script = tmp_path / "train.py"
    script.write_text(
        "import argparse, sys\nfrom reference.train import cli\n"
        "p = argparse.ArgumentParser()\ncli.add_arguments(p)\n"
        "sys.exit(cli.run(p.parse_args(sys.argv[1:])))\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port), str(script)]
    cmd += [str(model_dir), str(data_file), str(out), "--grad-accum", "4", "--batch-size", "2"]
    cmd += ["--log-every", "2", "--max-steps", "4", "--lr", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    records = [json.loads(x) for x in (out / "channel_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # written once, by rank 0
    expected = expected_window(model_dir, data_file)
    assert "rare" in expected and not math.isnan(records[0]["loss"])
    for record in records:
        check_record(record, expected)
    assert (out / "channel_loss.png").stat().st_size > 0


def test_the_closing_line_survives_a_window_without_tokens(tmp_path) -> None:
    from reference.train.cli import summary

    line = summary({"step": 3, "loss": None, "tokens": 0}, tmp_path)
    assert line.startswith("step 3: loss - over 0 tokens")
    line = summary({"step": 3, "loss": 1.23456, "tokens": 9}, tmp_path)
    assert line.startswith("step 3: loss 1.2346 over 9")
