"""`reference convert SRC DST --to FAMILY`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="an HF model directory (family from config.json) or a Megatron-LM "
                               "checkpoint (family from its hf_source.json, else guessed from its args)")
    p.add_argument("dst", help="output directory; appears whole or not at all")
    p.add_argument("--to", required=True,
                   help="a family's model_type (llama, qwen2, ...), 'megatron', or 'hf' (back to the "
                        "family a Megatron checkpoint came from)")
    p.add_argument("--dtype", help="cast floating tensors (bfloat16, float16, float32); default: keep")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-window-drop", action="store_true",
                   help="convert a sliding-window model to a target without windows; exact only "
                        "while sequences fit the window, recorded in DST/conversion.json")
    p.add_argument("--allow-drop", action="append", default=[], metavar="FEATURE",
                   help="the same for another feature that acts only on long inputs "
                        "(long_context_scaling: Qwen v1's dynamic NTK and log-n attention)")
    mg = p.add_argument_group("Megatron layout (with --to megatron)")
    mg.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    mg.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    mg.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    mg.add_argument("--layer-spec", choices=("local", "te"), default="local",
                    help="key layout: megatron-core's local spec or TransformerEngine's")
    mg.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                    help="pad the vocabulary to a multiple of N x tp (zeros; trimmed on the way back)")
    mg.add_argument("--pp-layers", type=_layers, default=None, metavar="N,N,...",
                    help="layers per pipeline stage (default: even split)")
    p.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES",
                   help="largest output shard (default: one file from a single-file source, else "
                        "the source's largest shard; 5 GiB from Megatron)")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def run(args: argparse.Namespace) -> int:
    from reference.converters import convert

    layout = None
    if args.to == "megatron":
        from reference.converters.megatron import MegatronLayout

        layout = MegatronLayout(tp=args.tp, pp=args.pp, vpp=args.vpp, layer_spec=args.layer_spec,
                                vocab_divisor=args.make_vocab_size_divisible_by, pp_layers=args.pp_layers)
    allow = [*args.allow_drop, *(["sliding_window"] if args.allow_window_drop else [])]
    report = convert(args.src, args.dst, to=args.to, dtype=args.dtype, force=args.force,
                     allow=allow, max_shard_bytes=args.max_shard_size, layout=layout)
    print(f"{report.source} -> {report.target}: {report.tensors} tensors, "
          f"{report.bytes / 2**20:.1f} MiB written to {args.dst}")
    for fold in report.folds:
        print(f"folded {fold}")
    for caveat in report.caveats:
        print(f"caveat: {caveat}")
    return 0
