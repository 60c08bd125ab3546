"""Streaming safetensors: read headers and single tensors, write shards tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then raw bytes. Reading one tensor is one `pread`;
copying one unchanged is a kernel-side `copy_file_range`: memory stays at one tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from reference.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
# Told (bytes written so far, bytes in all) as tensors are written; the CLI draws its bar with it.
Progress = Callable[[int, int], None]
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PAGE = 4096


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: file, absolute byte range, dtype and shape."""

    path: Path
    start: int
    length: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def meta(self) -> torch.Tensor:
        """A data-free stand-in, for planning shapes through transforms."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def load(self) -> torch.Tensor:
        """The tensor, read with one pread into memory of its own."""
        buf = bytearray(self.length)
        with open(self.path, "rb") as f:
            got = f.readinto(memoryview(buf)) if f.seek(self.start) == self.start else 0
        if got != self.length:
            raise InputError(f"{self.path}: truncated while reading a tensor")
        if self.length == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).reshape(self.shape)


class Mapped:
    """Tensors as views of their files' pages: nothing is read until a value is used, and
    pages are shared with the page cache (copy-on-write, so a tensor changed in place changes
    only this process's copy). Loading a model this way costs no time and no memory up front."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, entry: Entry) -> torch.Tensor:
        if entry.length == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if entry.path not in self._maps:
            with open(entry.path, "rb") as f:
                self._maps[entry.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = entry.length // entry.dtype.itemsize
        flat = torch.frombuffer(self._maps[entry.path], dtype=entry.dtype, count=count, offset=entry.start)
        return flat.reshape(entry.shape)  # the tensor keeps its map alive


def read_header(path: Path) -> dict[str, Entry]:
    """Every tensor of one safetensors file, validated against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise InputError(f"{path}: truncated or corrupt (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: corrupt safetensors header (not JSON)") from None
    base = 8 + n
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: corrupt header entry for '{name}'") from None
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want or base + end > size:
            raise InputError(f"{path}: tensor '{name}' is truncated or corrupt")
        entries[name] = Entry(path, base + begin, want, dtype, shape)
    return entries


def read_dir(directory: Path) -> dict[str, Entry]:
    """Every tensor of an HF model directory, from its index or its single file."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{index}: corrupt index (no weight_map)") from None
        entries: dict[str, Entry] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise InputError(f"{index}: names shard '{shard}', which is missing")
            entries.update(read_header(directory / shard))
        for name, shard in weight_map.items():
            if name not in entries or entries[name].path.name != shard:
                raise InputError(f"{index}: '{name}' is not in shard '{shard}'")
        return {name: entries[name] for name in weight_map}
    if (directory / SINGLE).is_file():
        return read_header(directory / SINGLE)
    raise InputError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors are read)")


@dataclass(frozen=True)
class Planned:
    """One output tensor: its name, dtype and shape, and how to produce its bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    source: Entry | None = None  # the bytes are this source range: copied byte for byte, not produced
    rows: Callable[[], list[torch.Tensor]] | None = None  # or these row blocks, written one after another

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _write_header(f, tensors: list[Planned]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    raw += b" " * ((_phase(tensors) - 8 - len(raw)) % PAGE)
    f.write(struct.pack("<Q", len(raw)) + raw)


def _phase(tensors: list[Planned]) -> int:
    """Where in a page the data should start, so that most copied bytes keep their offset
    within a page: the kernel then copies whole pages (a copy shifted within the page costs
    1.7x, `benchmarks/bench_copy.py`). The header's padding spaces absorb the shift."""
    votes: dict[int, int] = {}
    offset = 0
    for t in tensors:
        if t.source is not None and (t.source.start - offset) % 8 == 0:
            phase = (t.source.start - offset) % PAGE
            votes[phase] = votes.get(phase, 0) + t.nbytes
        offset += t.nbytes
    return max(votes, key=lambda p: votes[p]) if votes else 8


def _copy_range(path: Path, start: int, length: int, f, done: Callable[[int], None]) -> None:
    f.flush()
    with open(path, "rb") as s:
        offset, left = start, length
        while left:
            n = os.copy_file_range(s.fileno(), f.fileno(), left, offset)
            if n == 0:
                raise InputError(f"{path}: truncated while copying a tensor")
            offset, left = offset + n, left - n
            done(n)
    f.seek(0, os.SEEK_END)


def _fits(blocks: list[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """Whether the row blocks concatenate to a tensor of `dtype` and `shape`."""
    if len(blocks) == 1:
        return blocks[0].dtype == dtype and tuple(blocks[0].shape) == shape
    return (len(shape) > 0 and sum(b.shape[0] for b in blocks) == shape[0]
            and all(b.dtype == dtype and tuple(b.shape[1:]) == shape[1:] for b in blocks))


def _write_produced(t: Planned, f) -> None:
    """A computed tensor's bytes: produced, or its row blocks written one after another."""
    blocks = t.rows() if t.rows is not None else [t.produce()]
    if not _fits(blocks, t.dtype, t.shape):
        got = " + ".join(f"{b.dtype}{list(b.shape)}" for b in blocks)
        raise AssertionError(f"plan for '{t.name}' said {t.dtype}{list(t.shape)}, got {got}")
    for data in blocks:
        if data.numel():
            f.write(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_tensors(group: list[Planned], f, done: Callable[[int], None]) -> None:
    """The data of one shard, in order, telling `done` the bytes of each write. Unchanged
    tensors that lie back to back in one source file are copied by one kernel call."""
    run: list[Entry] = []  # byte ranges waiting to be copied as one

    def flush() -> None:
        if run:
            _copy_range(run[0].path, run[0].start, run[-1].start + run[-1].length - run[0].start, f, done)
            run.clear()

    for t in group:
        if t.source is not None:
            if run and (t.source.path != run[-1].path or t.source.start != run[-1].start + run[-1].length):
                flush()
            run.append(t.source)
            continue
        flush()
        _write_produced(t, f)  # its memory is released before the next tensor is made
        done(t.nbytes)
    flush()


def source_order(tensors: list[Planned]) -> list[Planned]:
    """Copies first, laid out as their sources lie, then every computed tensor in plan order.
    Copies then run back to back at their source offsets within a page, which the kernel
    copies fastest; a computed tensor between them (a zero bias) would shift every copy after
    it within its page (see `_phase`). File order means nothing to readers."""
    copies = sorted((t for t in tensors if t.source is not None),
                    key=lambda t: (str(t.source.path), t.source.start))
    return copies + [t for t in tensors if t.source is None]


def shard(tensors: Iterable[Planned], max_bytes: int | None) -> list[list[Planned]]:
    """Consecutive groups of at most max_bytes (None: no limit; a larger tensor gets a shard of
    its own); a copy from another source file than the copy before it starts a new group, so
    that each shard's copies share one offset within the page (see `source_order`)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    last: Path | None = None
    for t in tensors:
        moved = t.source is not None and last is not None and t.source.path != last
        full = max_bytes is not None and size + t.nbytes > max_bytes
        if shards[-1] and (full or moved):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
        last = t.source.path if t.source is not None else last
    return [s for s in shards if s]


def write_dir(tensors: list[Planned], directory: Path, max_bytes: int | None,
              progress: Progress | None = None) -> None:
    """Sharded safetensors plus their index, one tensor in memory at a time; a single shard is
    written as model.safetensors without an index, as transformers' save_pretrained does."""
    groups = shard(source_order(tensors), max_bytes)
    total, written = sum(t.nbytes for t in tensors), 0

    def done(n: int) -> None:
        nonlocal written
        written += n
        if progress is not None:
            progress(written, total)

    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        name = SINGLE if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        with open(directory / name, "wb") as f:
            _write_header(f, group)
            _write_tensors(group, f, done)
            weight_map.update(dict.fromkeys((t.name for t in group), name))
    if len(groups) == 1:
        return
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
