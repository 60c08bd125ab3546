"""`reference convert SRC DST --to TARGET`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

from reference.errors import InputError

# Flags that only shape a Megatron checkpoint (dest -> MegatronLayout field). They default to
# None, so that one given with another target is refused by name rather than ignored.
LAYOUT = {"tp": "tp", "pp": "pp", "vpp": "vpp", "layer_spec": "layer_spec",
          "make_vocab_size_divisible_by": "vocab_divisor", "pp_layers": "pp_layers", "ep": "ep", "etp": "etp",
          "ckpt_format": "ckpt_format"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from reference.converters.megatron.layout import CKPT_FORMATS, LAYER_SPECS, MegatronLayout

    d = MegatronLayout()
    p.add_argument("src", help="an HF model directory (family from config.json), a unified one "
                               "(written by --to unified), or a Megatron-LM checkpoint (family from "
                               "its hf_source.json, else --family, else the one its args fit)")
    p.add_argument("dst", help="output directory; appears whole or not at all")
    p.add_argument("--to", required=True,
                   help="a family's model_type (llama, qwen2, ...), 'unified', 'megatron', or 'hf' "
                        "(back to the family a unified or Megatron checkpoint came from)")
    p.add_argument("--family", metavar="NAME",
                   help="the HF family (model_type) of a Megatron-LM source without hf_source.json, "
                        "when its args fit several (llama, mistral, ...)")
    p.add_argument("--dtype", help="cast floating tensors (bfloat16, float16, float32); default: keep")
    p.add_argument("--fold-precision", choices=("exact", "dtype"), default="exact",
                   help="a folded tensor (Gemma's norms, Granite's multipliers) its dtype cannot hold "
                        "exactly is written in float32 (exact, the default; the output grows and this "
                        "says by how much), or kept in its dtype with the rounding measured (dtype)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-window-drop", action="store_true",
                   help="convert a sliding-window model to a target without windows; exact only "
                        "while sequences fit the window, recorded in DST/conversion.json")
    p.add_argument("--allow-drop", action="append", default=[], metavar="FEATURE",
                   help="the same for another feature that acts only on long inputs "
                        "(long_context_scaling: Qwen v1's dynamic NTK and log-n attention), or for "
                        "a part of the checkpoint no class computes with (mtp: DeepSeek-V3's "
                        "multi-token-prediction layer)")
    mg = p.add_argument_group("Megatron layout (only with --to megatron)")
    mg.add_argument("--tp", type=int, help=f"tensor-parallel size (default {d.tp})")
    mg.add_argument("--pp", type=int, help=f"pipeline-parallel size (default {d.pp})")
    mg.add_argument("--vpp", type=int, help="virtual pipeline stages per rank (default: none)")
    mg.add_argument("--layer-spec", choices=LAYER_SPECS,
                    help=f"key layout: megatron-core's local spec or TransformerEngine's "
                         f"(default {d.layer_spec})")
    mg.add_argument("--make-vocab-size-divisible-by", type=int, metavar="N",
                    help=f"pad the vocabulary to a multiple of N x tp (zeros; trimmed on the way back; "
                         f"default {d.vocab_divisor})")
    mg.add_argument("--pp-layers", type=_layers, metavar="N,N,...",
                    help="layers per pipeline stage (default: even split)")
    mg.add_argument("--ep", type=int, help=f"expert-parallel size: a mixture's experts spread over "
                                           f"this many ranks (default {d.ep})")
    mg.add_argument("--etp", type=int, help="tensor-parallel size of each expert (default: --tp)")
    mg.add_argument("--ckpt-format", choices=CKPT_FORMATS,
                    help=f"Megatron-LM's checkpoint format: per-rank files (torch), or a distributed "
                         f"checkpoint Megatron-LM can also load at another TP/PP (torch_dist) "
                         f"(default {d.ckpt_format})")
    p.add_argument("--max-shard-size", type=int, metavar="BYTES",
                   help="largest output shard, for an HF target (default: one file from a single-file "
                        "source, else the source's largest shard; 5 GiB from Megatron)")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[int, int], None] | None]:
    """One bar of bytes written (rate, ETA) on stderr when it is a terminal; else nothing, so
    that logs and pipes stay clean."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bars: list[tqdm] = []  # started by the first write, so that its rate and ETA time the writing

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="writing", total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def fold_lines(costs: list[dict]) -> list[str]:
    """One line per folded feature, from the measured per-tensor costs."""
    lines = []
    for feature in dict.fromkeys(c["feature"] for c in costs):
        mine = [c for c in costs if c["feature"] == feature]
        written = sorted({f"{c['stored']} -> {c['written']}" for c in mine})
        line = f"folded {feature} into {len(mine)} tensor{'s' * (len(mine) > 1)} ({', '.join(written)})"
        grew = sum(c["grew_bytes"] for c in mine)
        if grew:
            line += f", output {'+' if grew > 0 else '-'}{_size(abs(grew))}"
        if any(c["changed"] is None for c in mine):
            line += "; one-way"
        else:
            changed, values = sum(c["changed"] for c in mine), sum(c["values"] for c in mine)
            worst = max(c["max_error"] for c in mine)
            line += (f"; back: {changed} of {values} values differ (max {worst:.3g})" if changed
                     else "; back: bitwise")
        lines.append(line)
    return lines


def run(args: argparse.Namespace) -> int:
    given = {dest: getattr(args, dest) for dest in LAYOUT if getattr(args, dest) is not None}
    if given and args.to != "megatron":
        raise InputError(f"--{next(iter(given)).replace('_', '-')} applies only to --to megatron")
    if args.max_shard_size is not None and args.to == "megatron":
        raise InputError("--max-shard-size applies only to HF targets, not --to megatron")
    from reference.converters import convert

    layout = None
    if args.to == "megatron":
        from reference.converters.megatron import MegatronLayout

        layout = MegatronLayout(**{LAYOUT[dest]: value for dest, value in given.items()})
    allow = [*args.allow_drop, *(["sliding_window"] if args.allow_window_drop else [])]
    with progress_bar() as progress:
        report = convert(args.src, args.dst, to=args.to, dtype=args.dtype, force=args.force, allow=allow,
                         max_shard_bytes=args.max_shard_size, layout=layout, progress=progress,
                         fold_precision=args.fold_precision, family=args.family)
    print(f"{report.source} -> {report.target}: {report.tensors} tensors, "
          f"{report.bytes / 2**20:.1f} MiB written to {args.dst}")
    for line in report.read_as:
        print(line)
    for line in fold_lines(report.fold_costs):
        print(line)
    for caveat in report.caveats:
        print(f"caveat: {caveat}")
    return 0
