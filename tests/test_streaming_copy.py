"""How unchanged tensors travel: by the kernel, in runs, at their offset within a page.

Speed itself is measured by `nox -s bench`; this checks the mechanism that the benchmark's
figures rest on, so that a change cannot silently fall back to decoding and re-encoding.
"""

from __future__ import annotations

import os

import pytest
import torch
from harness import assert_bitwise, read_tensors

from reference.converters import convert
from reference.converters.safetensors_io import PAGE, Planned, read_dir, write_dir
from reference.tiny import tiny_model


def copies(monkeypatch) -> list[int]:
    """Record the byte count of every copy_file_range call."""
    calls: list[int] = []
    real = os.copy_file_range

    def counted(src: int, dst: int, count: int, offset_src: int | None = None, *rest) -> int:
        n = real(src, dst, count, offset_src, *rest)
        calls.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", counted)
    return calls


def test_a_rename_copies_every_byte_in_runs_and_in_phase(tmp_path, monkeypatch) -> None:
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    calls = copies(monkeypatch)
    convert(src, tmp_path / "dst", to="mistral")  # the same tensors under other names
    before, after = read_dir(src), read_dir(tmp_path / "dst")
    assert sum(calls) == sum(e.length for e in after.values())  # nothing decoded
    shards = {e.path for e in after.values()}
    assert len(calls) <= 2 * len(shards)  # one run per shard, two where it spans two sources
    for name, e in after.items():
        assert (e.start - before[name].start) % PAGE == 0, f"'{name}' shifted within its page"
    assert_bitwise(read_tensors(src), read_tensors(tmp_path / "dst"))


def test_computed_tensors_do_not_shift_the_copies(tmp_path, monkeypatch) -> None:
    """Llama -> Qwen2 adds zero q/k/v biases: they go after the copies, which stay in phase."""
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    calls = copies(monkeypatch)
    convert(src, tmp_path / "dst", to="qwen2")
    before, after = read_dir(src), read_dir(tmp_path / "dst")
    copied = {k: e for k, e in after.items() if not k.endswith(".bias")}
    assert sum(calls) == sum(e.length for e in copied.values())
    assert all((e.start - before[k].start) % PAGE == 0 for k, e in copied.items())
    # ... and the way back from what we wrote runs in phase too.
    calls.clear()
    convert(tmp_path / "dst", tmp_path / "back", to="llama")
    back = read_dir(tmp_path / "back")
    assert all((e.start - after[k].start) % PAGE == 0 for k, e in back.items())
    assert_bitwise(read_tensors(src), read_tensors(tmp_path / "back"))


def test_row_blocks_are_written_as_their_concatenation(tmp_path) -> None:
    """A tensor given as row blocks (a Megatron tensor's TP pieces) is written block after
    block, the same bytes as its concatenation, never concatenated; blocks that do not make the
    planned tensor are refused."""
    blocks = [torch.arange(12, dtype=torch.float32).reshape(3, 4), torch.ones(2, 4)]
    whole = torch.cat(blocks)

    def never() -> torch.Tensor:
        raise AssertionError("concatenated instead of written block by block")

    (tmp_path / "rows").mkdir()
    (tmp_path / "cat").mkdir()
    write_dir([Planned("w", torch.float32, (5, 4), never, None, lambda: blocks)], tmp_path / "rows", None)
    write_dir([Planned("w", torch.float32, (5, 4), lambda: whole)], tmp_path / "cat", None)
    written = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("rows", "cat")]
    assert written[0] == written[1]
    (tmp_path / "bad").mkdir()
    with pytest.raises(AssertionError, match=r"said torch.float32\[6, 4\]"):
        write_dir([Planned("w", torch.float32, (6, 4), never, None, lambda: blocks)], tmp_path / "bad", None)
