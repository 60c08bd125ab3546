"""How unchanged tensors are best copied: the measurements behind the converter's writer.

    python benchmarks/bench_copy.py [--layers 8] [--repeat 5] [--workdir DIR]

On the bench_convert checkpoint (bf16, hidden 2048, 4 shards), in one process, alternating
the variants round by round after `sync`, with the source in the page cache:
- whole files, one copy_file_range each (what `cp` does);
- one call per tensor, each landing at its source offset within a 4 KiB page;
- one call per tensor, shifted by 8 bytes within the page (what a header of another length
  does to every copy);
- `reference convert` to mistral (the same tensors renamed) and to qwen2 (plus zero biases).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def copy_tensors(src: Path, out: Path, shift: int) -> None:
    """Each shard's header bytes (plus `shift`), then its tensors one call each, in file order."""
    from reference.converters.safetensors_io import read_header

    for f in sorted(src.glob("*.safetensors")):
        entries = sorted(read_header(f).values(), key=lambda e: e.start)
        with open(f, "rb") as s, open(out / f.name, "wb") as d:
            d.write(b" " * (entries[0].start + shift))
            d.flush()
            for e in entries:
                offset, left = e.start, e.length
                while left:
                    n = os.copy_file_range(s.fileno(), d.fileno(), left, offset)
                    offset, left = offset + n, left - n


def copy_whole(src: Path, out: Path) -> None:
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as s, open(out / f.name, "wb") as d:
            left = f.stat().st_size
            while left:
                left -= os.copy_file_range(s.fileno(), d.fileno(), left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from reference.converters import convert

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, out = Path(tmp) / "llama", Path(tmp) / "out"
        maker = Path(__file__).with_name("bench_convert.py")  # the same synthetic checkpoint
        subprocess.run([sys.executable, str(maker), "--make", str(src), str(args.layers)], check=True)
        variants: dict[str, Callable[[Path], object]] = {
            "whole files (as cp)": lambda o: copy_whole(src, o),
            "per tensor, in phase": lambda o: copy_tensors(src, o, 0),
            "per tensor, shifted 8 bytes": lambda o: copy_tensors(src, o, 8),
            "reference: llama -> mistral": lambda o: convert(src, o, to="mistral", force=True),
            "reference: llama -> qwen2": lambda o: convert(src, o, to="qwen2", force=True),
        }
        copy_whole(src, Path(tmp))  # warm: the source in the page cache, every import done
        convert(src, Path(tmp) / "warm", to="qwen2")
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, run in variants.items():
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                os.sync()
                start = time.perf_counter()
                run(out)
                times[name].append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    from reference.families.cli import table

    base = sorted(times["per tensor, in phase"])[args.repeat // 2]
    rows = [["layers", "GiB", "copy", "median s", "best s", "worst s", "vs per tensor in phase"]]
    for name, ts in times.items():
        mid = sorted(ts)[args.repeat // 2]
        rows.append([str(args.layers), f"{size / 2**30:.2f}", name, f"{mid:.2f}", f"{min(ts):.2f}",
                     f"{max(ts):.2f}", f"{mid / base:.2f}x"])
    print(table(rows))


if __name__ == "__main__":
    main()
