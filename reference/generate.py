"""`reference generate MODEL --prompt TEXT`: the unified model's stream_generate, printed as it
comes, with the model directory's own tokenizer (read locally, never from the network)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reference.errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="a model directory the unified model loads (an HF family's, "
                                            "a unified one), with its tokenizer files")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="at most N tokens (default 128)")
    p.add_argument("--devices", nargs="+", metavar="DEVICE",
                   help="spread the layers over these devices (cuda:0 cuda:1 ..., or cpu); default: the CPU")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="with --sample (default 0: off)")
    p.add_argument("--seed", type=int, help="with --sample: reproduce a run")
    p.add_argument("--dtype", help="cast the weights (bfloat16, float16, float32); default: as stored")


def _tokenizer(path: Path):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: no tokenizer could be read from the directory ({first})") from None


def run(args: argparse.Namespace) -> int:
    if not args.model.is_dir():
        raise InputError(f"{args.model}: no such model directory")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: {args.max_new_tokens} (give at least 1)")
    if not any((args.model / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{args.model}: no tokenizer files (tokenizer.json or tokenizer_config.json)")
    tokenizer = _tokenizer(args.model)
    from reference.converters.conversion import parse_dtype
    from reference.modeling import UnifiedForCausalLM

    model = UnifiedForCausalLM.from_pretrained(args.model, dtype=parse_dtype(args.dtype))
    if args.devices:
        try:
            model.set_device(args.devices)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"--devices {' '.join(args.devices)}: {str(e).splitlines()[0]}") from None
    stream = model.stream_generate(text=args.prompt, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                                   do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                                   top_k=args.top_k, seed=args.seed)
    for pieces in stream:
        sys.stdout.write(pieces[0])
        sys.stdout.flush()  # each token as it comes
    sys.stdout.write("\n")
    return 0
