"""`reference convert SRC DST --to FAMILY`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="HF model directory (its family is read from config.json)")
    p.add_argument("dst", help="output directory; appears whole or not at all")
    p.add_argument("--to", required=True, help="target family (a model_type, e.g. llama, qwen2)")
    p.add_argument("--dtype", help="cast floating tensors (bfloat16, float16, float32); default: keep")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-window-drop", action="store_true",
                   help="convert a sliding-window model to a target without windows; exact only "
                        "while sequences fit the window, recorded in DST/conversion.json")
    p.add_argument("--max-shard-size", type=int, default=5 * 2**30, metavar="BYTES",
                   help="largest output shard (default 5 GiB)")


def run(args: argparse.Namespace) -> int:
    from reference.converters.convert import convert

    allow = ["sliding_window"] if args.allow_window_drop else []
    report = convert(args.src, args.dst, to=args.to, dtype=args.dtype, force=args.force,
                     allow=allow, max_shard_bytes=args.max_shard_size)
    print(f"{report.source} -> {report.target}: {report.tensors} tensors, "
          f"{report.bytes / 2**20:.1f} MiB written to {args.dst}")
    for caveat in report.caveats:
        print(f"caveat: {caveat}")
    return 0
