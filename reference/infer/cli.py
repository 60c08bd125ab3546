"""`reference infer MODEL DATA OUT --workers N`: batch inference over N model replicas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="a model directory with its tokenizer files")
    p.add_argument("data", type=Path, help="JSONL rows with 'prompt' (or chat 'messages'), optional 'id'")
    p.add_argument("out", type=Path, help="JSONL, one row per input in input order: id, output or error")
    p.add_argument("--workers", type=int, required=True, metavar="N", help="model replicas, one process each")
    p.add_argument("--devices", help="comma-separated devices split evenly among the workers "
                                     "(cuda:0,cuda:1 or cpu,cpu); default: the CPU, its cores split")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="rows per batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="K", help="default 256")
    p.add_argument("--backend", choices=("hf", "unified", "vllm"), default="hf",
                   help="hf: transformers' AutoModelForCausalLM; unified: reference's model; "
                        "vllm: vLLM's LLM, tensor parallel over each worker's devices (default hf)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: worker processes on this machine (one node of torchrun each); "
                        "ray: a Ray Data pipeline, one actor per worker (default local)")
    p.add_argument("--node-timeout", type=float, default=86400.0, metavar="S",
                   help="under torchrun: how long a node waits for the others at the start and "
                        "for their shares to finish (default 86400)")
    p.add_argument("--sample", action="store_true", help="sample, seeded per row (seed + id); default greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="with --sample (default 0)")


def run(args: argparse.Namespace) -> int:
    from reference.infer.runner import Infer, WorkersFailed

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    infer = Infer(args.model, args.data, args.out, args.workers, devices=devices, batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens, backend=args.backend, engine=args.engine,
                  do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  node_timeout_s=args.node_timeout)
    try:
        infer.run()
    except WorkersFailed as e:
        print(f"reference infer: error: {e}", file=sys.stderr)
        return 1
    return 0
