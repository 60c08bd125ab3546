"""Converting a ~1 GB bf16 Llama-shaped checkpoint to qwen2 and back, and to Megatron-LM's two
formats (per-rank `torch` files, distributed `torch_dist`) and back, side by side with `cp -r`
(the I/O bound), `cp -r` then `sync` of the copy (as durable as a conversion, which fsyncs its
output) and the usual from_pretrained + save_pretrained path, in one run.

    python benchmarks/bench_convert.py [--layers 8 16] [--workdir DIR]

Each row is the median of --repeat runs (default 7), taken round-robin over the rows, with the
best and worst data path beside it; a conversion is compared with `cp -r` of its own source,
run by run. Each command runs in its own process,
started from this small one (so that the child's peak RSS is its own), after `sync` (so that
no row pays for the previous row's dirty pages); wall time and peak RSS come from wait4().
The data path is timed inside that process, after the same job has run once on a tiny
checkpoint (so every import and lazy load is done); "RSS over import" is the peak less the
peak before the timed job. "Anonymous RSS over start" samples RssAnon (/proc/self/status)
every 5 ms during the timed job, less its value at the start: the memory the job holds, without
the page cache of mmap-read files that peak RSS also counts. The source is in the page cache
for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(kind: str, tiny: Path, src: Path, dst: Path, to: str) -> None:
    """In a child: do the whole job once on a tiny checkpoint (every import and lazy load),
    then time the real one; print (seconds, peak RSS in KiB before the real job, peak anonymous
    RSS in KiB over its value at the start of the real job)."""
    import json
    import resource

    def job(a: Path, b: Path) -> None:
        if kind == "reference":
            from reference.converters import convert

            if to.startswith("megatron:"):  # megatron:FORMAT, at TP 2 x PP 2
                from reference.converters.megatron import MegatronLayout

                layout = MegatronLayout(tp=2, pp=2, ckpt_format=to.split(":")[1])
                convert(a, b, to="megatron", layout=layout)
            else:
                convert(a, b, to=to)
        else:  # the usual path: load the whole model, save it again
            import torch
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(a, dtype=torch.bfloat16).save_pretrained(b)

    warm = dst.with_name(dst.name + "-warm")
    shutil.rmtree(warm, ignore_errors=True)
    if (src / "latest_checkpointed_iteration.txt").is_file():  # warm the reader of src's format too
        from reference.converters import convert
        from reference.converters.megatron import MegatronLayout
        from reference.converters.megatron.dist import is_dist_checkpoint

        fmt = "torch_dist" if is_dist_checkpoint(src) else "torch"
        tiny_src = dst.with_name(dst.name + "-warm-src")
        shutil.rmtree(tiny_src, ignore_errors=True)
        convert(tiny, tiny_src, to="megatron", layout=MegatronLayout(tp=2, pp=2, ckpt_format=fmt))
        tiny = tiny_src
    job(tiny, warm)
    import threading

    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    os.sync()
    done, peak, at_start = threading.Event(), [0], anon()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], anon())

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    job(src, dst)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps([seconds, before, max(peak[0], anon()) - at_start]))


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


def measure_once(argv: list[str], out: Path) -> tuple[float, float, float, float, float | None]:
    """Wall and data-path seconds, peak RSS, RSS before the job and anonymous RSS over its start
    (MiB; None for a command not run by `timed`) of one command run in its own process, after `sync`."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{argv} failed: {proc.stderr.read().decode()[-500:]}")
    lines = proc.stdout.read().decode().strip().splitlines()
    data, before, anon = json.loads(lines[-1]) if "--timed" in argv else (wall, 0, None)
    return wall, data, usage.ru_maxrss / 1024, before / 1024, None if anon is None else anon / 1024


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run(layers: int, work: Path, repeat: int) -> list[list[str]]:
    src, tiny = work / f"llama-{layers}", work / "tiny"
    py = sys.executable
    subprocess.run([py, __file__, "--make", str(src), str(layers)], check=True)
    subprocess.run([py, __file__, "--make", str(tiny), "0"], check=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))

    def child(kind: str, a: Path, b: Path, to: str = "-") -> list[str]:
        return [py, __file__, "--timed", kind, str(tiny), str(a), str(b), to]

    def cp(a: Path, b: Path) -> list[str]:
        return ["cp", "-r", str(a), str(b)]

    def cp_sync(a: Path, b: Path) -> list[str]:  # as durable as a conversion: every file and DST fsynced
        return ["sh", "-c", f'cp -r "{a}" "{b}" && sync "{b}" "{b}"/*']

    # (name, output directory, command, the cp -r row it is compared with: the same source).
    # Each conversion is compared with copying its own source: how a file was written changes
    # how fast it reads back (cp -r of a directory written by copy_file_range, as the qwen2
    # one is, measured 1.5x slower than of one written by write()).
    cases = [
        ("cp -r (llama)", work / "cp", cp(src, work / "cp"), "cp -r (llama)"),
        ("cp -r + sync (llama)", work / "cps", cp_sync(src, work / "cps"), "cp -r + sync (llama)"),
        ("reference: llama -> qwen2", work / "q", child("reference", src, work / "q", "qwen2"),
         "cp -r (llama)"),
        ("cp -r (that qwen2)", work / "cpq", cp(work / "q", work / "cpq"), "cp -r (that qwen2)"),
        ("reference: qwen2 -> llama", work / "l", child("reference", work / "q", work / "l", "llama"),
         "cp -r (that qwen2)"),
        ("from_pretrained + save_pretrained", work / "u", child("usual", src, work / "u"), "cp -r (llama)"),
        ("reference: llama -> megatron torch (tp2 pp2)", work / "mt",
         child("reference", src, work / "mt", "megatron:torch"), "cp -r (llama)"),
        ("reference: llama -> megatron torch_dist", work / "md",
         child("reference", src, work / "md", "megatron:torch_dist"), "cp -r (llama)"),
        ("cp -r (that torch)", work / "cpmt", cp(work / "mt", work / "cpmt"), "cp -r (that torch)"),
        ("reference: megatron torch -> llama", work / "lt",
         child("reference", work / "mt", work / "lt", "hf"), "cp -r (that torch)"),
        ("cp -r (that torch_dist)", work / "cpmd", cp(work / "md", work / "cpmd"), "cp -r (that torch_dist)"),
        ("reference: megatron torch_dist -> llama", work / "ld",
         child("reference", work / "md", work / "ld", "hf"), "cp -r (that torch_dist)"),
    ]
    measure_once(cases[0][2], work / "cp")  # read the source once: every row sees a warm page cache
    # Round-robin, so that every row meets the same page-cache writeback and machine load: on
    # this machine one command's time moves by 2x from run to run, which a row-after-row median
    # of three turned into spurious gaps.
    runs: dict[str, list[tuple[float, float, float, float, float | None]]] = {name: [] for name, *_ in cases}
    for _ in range(repeat):
        for name, out, argv, _ in cases:
            runs[name].append(measure_once(argv, out))
    rows = []
    for name, _, _, baseline in cases:
        # Paired: each run against the cp -r of its own round, so that a slow drift of the
        # machine (cp -r reads 0.7 s one minute and 1.4 s a few minutes later) cancels.
        cps = [r[1] for r in runs[baseline]]
        wall, data = median([r[0] for r in runs[name]]), [r[1] for r in runs[name]]
        ratio = median([d / c for d, c in zip(data, cps, strict=True)])
        rss, before = max(r[2] for r in runs[name]), max(r[3] for r in runs[name])
        anon = "-" if runs[name][0][4] is None else f"{max(r[4] for r in runs[name]):.0f}"
        rows.append([str(layers), f"{size / 2**30:.2f}", name, f"{wall:.2f}", f"{median(data):.2f}",
                     f"{min(data):.2f}", f"{max(data):.2f}", f"{ratio:.2f}x",
                     f"{min(data) / min(cps):.2f}x", f"{rss:.0f}", f"{max(rss - before, 0):.0f}", anon])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=7, help="runs per row; the median is shown")
    parser.add_argument("--make", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    parser.add_argument("--timed", nargs=5, metavar=("KIND", "TINY", "SRC", "DST", "TO"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timed:
        kind, tiny, src, dst, to = args.timed
        timed(kind, Path(tiny), Path(src), Path(dst), to)
        return
    if args.make:  # in a child process, so that this one stays small
        if args.make[1] == "0":
            from reference.tiny import save_tiny

            save_tiny("llama", Path(args.make[0]))
        else:
            make_checkpoint(Path(args.make[0]), int(args.make[1]))
        return
    header = ["layers", "GiB", "command", "wall s", "data path s", "best s", "worst s",
              "vs cp of its source (paired median)", "best vs best cp", "peak RSS MiB",
              "RSS over import MiB", "anonymous RSS over start MiB"]
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
