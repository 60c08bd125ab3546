"""Sequence parallelism on 2 gloo processes beside 1 process: activation memory and wall of one
forward + backward over a long sequence, Ulysses and ring side by side.

    python benchmarks/bench_sequence_parallel.py [--seq 8192] [--degree 2]

A small unified Llama (hidden 256, 2 layers, GQA 4/2 heads of 64, vocab 2048), fp32, batch 1,
loss = sum of the logits. Each configuration runs in fresh processes: the model is built, a short
forward + backward warms up, then the process's resident set is read and its high-water mark
reset (/proc/self/clear_refs), and the long forward + backward runs. "activation" is the peak
RSS minus the RSS after the build and warm-up: the memory the long sequence itself costs. One
process gets every core as threads; each of the `degree` ranks gets cores / degree. "ring x 1"
is the ring's block kernel in one process (a group of one), its own baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build(backend: str):  # noqa: ANN201
    import torch
    from transformers import LlamaConfig

    from reference.families.registry import FAMILIES
    from reference.modeling import UnifiedForCausalLM
    from reference.modeling.config import UnifiedConfig

    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    spec = FAMILIES["llama"].read(config.to_dict(), "llama")
    return UnifiedForCausalLM(UnifiedConfig.from_spec(spec, attn_implementation=backend))


def step(model, ids) -> None:  # noqa: ANN001
    model(input_ids=ids).logits.sum().backward()
    model.zero_grad(set_to_none=True)


def measure(model, ids) -> dict[str, float]:  # noqa: ANN001
    """Warm up on a short slice, then one long forward + backward: wall and RSS figures."""
    step(model, ids[:, :64])
    base = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    start = time.perf_counter()
    step(model, ids)
    wall = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    return {"wall": wall, "base": base, "peak": peak, "activation": peak - base}


def rank_main(rank: int, degree: int, rendezvous: str, mode: str, backend: str, seq: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // degree))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=degree)
    model = build(backend).enable_sequence_parallel(mode=mode)
    ids = torch.randint(0, 2048, (1, seq), generator=torch.Generator().manual_seed(0))
    mine = torch.arange(seq).tensor_split(degree)[rank]
    # the warm-up's 64 positions are split too: each rank passes its share of them
    step(model, ids[:, torch.arange(64).tensor_split(degree)[rank]])
    dist.barrier()
    base = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    step(model, ids[:, mine])
    dist.barrier()
    wall = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    Path(out, f"{rank}.json").write_text(json.dumps({"wall": wall, "base": base, "peak": peak,
                                                     "activation": peak - base}))
    dist.destroy_process_group()


def one_process(backend: str, seq: int, out: str) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = build(backend)
    ids = torch.randint(0, 2048, (1, seq), generator=torch.Generator().manual_seed(0))
    Path(out, "0.json").write_text(json.dumps(measure(model, ids)))


def run(degree: int, mode: str | None, backend: str, seq: int) -> list[dict[str, float]]:
    """The per-rank figures of one configuration, each in fresh processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        if mode is None:
            proc = mp.get_context("spawn").Process(target=one_process, args=(backend, seq, out))
            proc.start()
            proc.join()
            if proc.exitcode:
                raise RuntimeError(f"one process, {backend}: exit code {proc.exitcode}")
        else:
            rendezvous = str(Path(out, "rendezvous"))
            mp.start_processes(rank_main, args=(degree, rendezvous, mode, backend, seq, out), nprocs=degree,
                               start_method="spawn")
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(degree if mode else 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--degree", type=int, default=2)
    args = p.parse_args()
    configs = [("1 process", 1, None, "eager"), ("1 process", 1, None, "sdpa"),
               (f"ulysses x {args.degree}", args.degree, "ulysses", "eager"),
               (f"ulysses x {args.degree}", args.degree, "ulysses", "sdpa"),
               ("ring x 1", 1, "ring", "sdpa"), (f"ring x {args.degree}", args.degree, "ring", "sdpa")]
    print(f"forward + backward, batch 1 x {args.seq} tokens, fp32, {os.cpu_count()} cores\n")
    print("| run | attention | wall | activation per rank (max) | peak RSS per rank (max) |")
    print("|---|---|---|---|---|")
    for name, degree, mode, backend in configs:
        ranks = run(degree, mode, backend, args.seq)
        kernel = "ring blocks" if mode == "ring" else backend
        print(f"| {name} | {kernel} | {max(r['wall'] for r in ranks):.1f} s | "
              f"{max(r['activation'] for r in ranks):.0f} MiB | {max(r['peak'] for r in ranks):.0f} MiB |",
              flush=True)


if __name__ == "__main__":
    main()
