"""`reference inspect MODEL --text "..."`: the probes of one forward as tables, and with --plot
as PNG heat maps (cheap to import: torch and transformers are imported in `run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reference.errors import InputError, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `inspect` subcommand's arguments."""
    parser.add_argument("model", type=Path, help="local model directory with a tokenizer (any family held)")
    parser.add_argument("--text", required=True, help="the text to run the model on")
    parser.add_argument("--layer", type=int, default=-1, help="layer of the tables and the attention map "
                        "(negative counts from the last; default the last)")
    parser.add_argument("--top-k", type=int, default=5, metavar="K",
                        help="tokens per position in the logit lens")
    parser.add_argument("--plot", type=Path, metavar="DIR",
                        help="write attention_layerL.png, cos_distance.png and logit_lens.png here")


def run(args: argparse.Namespace) -> int:
    """Run the model on the text inside record() and print the three probes of the layer."""
    if args.plot is not None:
        require("train", "matplotlib")
    import torch
    from transformers import AutoTokenizer

    from reference.modeling import UnifiedForCausalLM

    if not (args.model / "config.json").is_file():
        raise InputError(f"{args.model}: no config.json (a model directory is needed)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise InputError(f"{args.model}: no tokenizer loads from it ({e.__class__.__name__})") from None
    model = UnifiedForCausalLM.from_pretrained(args.model).eval()
    n = len(model.layers)
    if not -n <= args.layer < n:
        raise InputError(f"--layer {args.layer}: {args.model} has {n} layers (0..{n - 1})")
    ids = tokenizer(args.text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise InputError("--text has no tokens")
    with torch.no_grad(), model.record():
        model(input_ids=ids)
    model.tokenizer = tokenizer
    model.show_cos_distance(args.layer, show=True)
    print()
    model.show_topk_token(args.layer, k=args.top_k, show=True)
    print()
    model.show_attention(args.layer, -1, None, show=True)
    if args.plot is not None:
        from reference.modeling import plots

        for path in plots.write(model, args.plot, args.layer, tokenizer):
            print(f"wrote {path}")
    return 0
