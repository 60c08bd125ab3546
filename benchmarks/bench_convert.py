"""Converting a ~1 GB bf16 Llama-shaped checkpoint to qwen2 and back, side by side with `cp -r`
(the I/O bound) and the usual from_pretrained + save_pretrained path, in one run.

    python benchmarks/bench_convert.py [--layers 8 16] [--workdir DIR]

Each row is the median of --repeat runs (default 3). Each command runs in its own process,
started from this small one (so that the child's peak RSS is its own), after `sync` (so that
no row pays for the previous row's dirty pages); wall time and peak RSS come from wait4().
The data path is wall time less the cost of starting Python and importing: the same command
run on a tiny checkpoint. The source is in the page cache for every row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USUAL = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
"""


def make_checkpoint(path: Path, layers: int) -> None:
    """A synthetic bf16 Llama (hidden 2048, vocab 32000, GQA 16/4) in 4 shards."""
    import torch
    from transformers import LlamaConfig

    from reference.converters.safetensors_io import Planned, write_dir

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=128, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    planned = [Planned(k, torch.bfloat16, s, lambda s=s: torch.randn(s, generator=gen).to(torch.bfloat16))
               for k, s in shapes.items()]
    total = sum(p.nbytes for p in planned)
    write_dir(planned, path, max_bytes=total // 4 + 1)
    config.save_pretrained(path)


def measure(argv: list[str], out: Path | None = None, repeat: int = 1) -> tuple[float, float]:
    """Median wall seconds and peak RSS (MiB) of a command, each run in its own process."""
    runs = []
    for _ in range(repeat):
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        runs.append(_once(argv))
    walls = sorted(w for w, _ in runs)
    return walls[len(walls) // 2], max(r for _, r in runs)


def _once(argv: list[str]) -> tuple[float, float]:
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{argv} failed: {proc.stderr.read().decode()[-500:]}")
    return wall, usage.ru_maxrss / 1024


def run(layers: int, work: Path, repeat: int) -> list[list[str]]:
    src, tiny = work / f"llama-{layers}", work / "tiny"
    py = sys.executable
    subprocess.run([py, __file__, "--make", str(src), str(layers)], check=True)
    subprocess.run([py, __file__, "--make", str(tiny), "0"], check=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    convert = [py, "-m", "reference", "convert"]
    base_ref = measure([*convert, str(tiny), str(work / "t1"), "--to", "qwen2"], work / "t1", repeat)
    base_usual = measure([py, "-c", USUAL, str(tiny), str(work / "t2")], work / "t2", repeat)
    cases = [  # (name, output directory, command, start-up baseline)
        ("cp -r", work / "cp", ["cp", "-r", str(src), str(work / "cp")], (0.0, 0.0)),
        ("reference: llama -> qwen2", work / "q", [*convert, str(src), str(work / "q"), "--to", "qwen2"],
         base_ref),
        ("reference: qwen2 -> llama", work / "l",
         [*convert, str(work / "q"), str(work / "l"), "--to", "llama"], base_ref),
        ("from_pretrained + save_pretrained", work / "u", [py, "-c", USUAL, str(src), str(work / "u")],
         base_usual),
    ]
    measure(cases[0][2])  # read the source once, so that every row sees a warm page cache
    rows = []
    cp_data = 1.0
    for name, out, argv, (base_wall, base_rss) in cases:
        wall, rss = measure(argv, out, repeat)
        data = wall - base_wall
        cp_data = data if name == "cp -r" else cp_data
        rows.append([str(layers), f"{size / 2**30:.2f}", name, f"{wall:.2f}", f"{data:.2f}",
                     f"{data / cp_data:.2f}x", f"{rss:.0f}", f"{max(rss - base_rss, 0):.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--make", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:  # in a child process, so that this one stays small
        if args.make[1] == "0":
            from reference.tiny import save_tiny

            save_tiny("llama", Path(args.make[0]))
        else:
            make_checkpoint(Path(args.make[0]), int(args.make[1]))
        return
    header = ["layers", "GiB", "command", "wall s", "data path s", "vs cp", "peak RSS MiB",
              "RSS over import MiB"]
    rows = [header]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for layers in args.layers:
            work = Path(tmp) / str(layers)
            work.mkdir()
            rows += run(layers, work, args.repeat)
            shutil.rmtree(work)
    from reference.families.cli import table

    print(table(rows))
    print("\nlargest tensor: 32000 x 2048 bf16 = 125 MiB (embedding and lm_head)")


if __name__ == "__main__":
    main()
