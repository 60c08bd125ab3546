"""Batch inference on the CPU cores: one worker with every thread, one worker per core, and a
plain single-process transformers `generate()` loop, over the same rows in one run.

    PYTHONPATH=. python benchmarks/bench_infer.py [--rows 200] [--batch-size 8] [--max-new-tokens 16]
    PYTHONPATH=. python benchmarks/bench_infer.py --device cuda:0 [--hidden 512 --layers 4]

With `--device`, the rows are one GPU's: the plain loop on it, one replica on it, and two and
four replicas sharing it (`--workers 2 --devices cuda:0`).

A CPU-sized Llama (hidden 512, 4 layers, GQA 8/2, vocab 32000, fp32, filled by
`reference.tiny.fill`) with a byte-level BPE tokenizer trained here; prompts of 2 to 150 words
(a few to ~300 tokens), greedy. `Infer` has no threads-per-worker knob: it gives each CPU worker
cores // workers torch threads, so on 2 cores 1 worker runs 2 threads and 2 workers 1 each. The
plain loop runs the same length-sorted batches (`reference.infer.runner.batches`) in this
process with torch's default threads. Rows/s is over each call's wall: for `Infer.run` that
includes spawning the workers, their imports and model load; for the loop, `from_pretrained`
(its imports are already done). The three outputs are checked to hold the same ids in input
order and the same texts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = [a + b for a in ("ka", "lo", "mi", "tur", "sen", "vo", "ra", "pel", "dis", "an", "qu", "ex")
         for b in ("n", "ta", "rem", "os", "i", "ber", "ul", "ing", "e", "ax")]


def prompts(n: int) -> list[str]:
    """`n` prompts of 2 to 150 words, seeded."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 150))) + "." for _ in range(n)]


def make_model(path: Path, texts: list[str], hidden: int, layers: int) -> None:
    """The small Llama and a byte-level BPE tokenizer trained on `texts`, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from reference.tiny import fill

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>").save_pretrained(path)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 43 // 16,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), head_dim=64, pad_token_id=0,
                         eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fill(model, 0)
    model.save_pretrained(path)


def plain_loop(model_path: Path, data: Path, out: Path, batch_size: int, new: int, device: str) -> None:
    """Every row through `generate()` in this process, batch by batch, written like Infer's output."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reference.infer.rows import read_rows
    from reference.infer.runner import batches

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval().to(device)
    pad, eos = tokenizer.pad_token_id, model.config.eos_token_id
    rows = read_rows(data)
    texts = {}
    for batch in batches(rows, batch_size):
        encoded = [tokenizer(r.prompt)["input_ids"] for r in batch]
        width = max(len(x) for x in encoded)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=device)
        with torch.no_grad():
            new_ids = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                     pad_token_id=pad, eos_token_id=eos)[:, width:]
        for r, tokens in zip(batch, new_ids.tolist(), strict=True):
            cut = tokens.index(eos) if eos in tokens else len(tokens)
            texts[r.key] = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    out.write_text("".join(json.dumps({"id": r.id, "output": texts[r.key]}) + "\n" for r in rows))


def results(rows: int, batch_size: int, new: int, work: Path, device: str, hidden: int,
            layers: int) -> tuple[list[list[str]], int]:
    """The table's rows, after checking the outputs agree; and torch's threads here."""
    import torch

    from reference.infer import Infer

    texts = prompts(rows)
    model_path, data = work / "small", work / "prompts.jsonl"
    make_model(model_path, texts, hidden, layers)
    data.write_text("".join(json.dumps({"id": f"r{i:04d}", "prompt": t}) + "\n"
                            for i, t in enumerate(texts)))
    runs = {"plain generate() loop, 1 process": lambda out: plain_loop(model_path, data, out, batch_size,
                                                                       new, device)}
    if device == "cpu":
        for n, name in ((1, "Infer: 1 worker x 2 threads"), (2, "Infer: 2 workers x 1 thread")):
            runs[name] = lambda out, n=n: Infer(model_path, data, out, n, batch_size=batch_size,
                                                max_new_tokens=new).run()
    for n in () if device == "cpu" else (1, 2, 4):
        runs[f"Infer: {n} replica(s) on {device}"] = (
            lambda out, n=n: Infer(model_path, data, out, n, devices=[device], batch_size=batch_size,
                                   max_new_tokens=new).run())
    table, outputs = [], {}
    for i, (name, call) in enumerate(runs.items()):
        out = work / f"out-{i}.jsonl"
        start = time.perf_counter()
        call(out)
        wall = time.perf_counter() - start
        outputs[name] = got = [json.loads(line) for line in out.read_text().splitlines()]
        want = [f"r{i:04d}" for i in range(rows)]
        assert [r["id"] for r in got] == want, f"{name}: ids differ from the input's"
        failed = [r for r in got if "output" not in r]
        assert not failed, f"{name}: {len(failed)} rows failed, first {failed[0]}"
        # the same batches in the same kernels give the same texts; a GPU may pick other kernels
        # for another process's allocations, so differences are counted, not hidden
        differ = sum(a != b for a, b in zip(got, next(iter(outputs.values())), strict=True))
        table.append([name, f"{wall:.1f} s", f"{rows / wall:.2f}", str(differ)])
    return table, torch.get_num_threads()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu (default), or one GPU: cuda:0")
    p.add_argument("--hidden", type=int, default=512, help="the Llama's width (heads of 64)")
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        table, threads = results(args.rows, args.batch_size, args.max_new_tokens, Path(tmp), args.device,
                                 args.hidden, args.layers)
    import torch

    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {cores} cores, {threads} threads in the plain loop, "
          f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end", file=sys.stderr)
    gpu = f", {torch.cuda.get_device_name(args.device)}" if args.device != "cpu" else ""
    print(f"{args.rows} rows, batch {args.batch_size}, {args.max_new_tokens} new tokens, greedy, "
          f"Llama hidden {args.hidden} x {args.layers} layers{gpu}; every id once, in input order\n")
    print("| run | wall | rows/s | rows whose text differs from the loop's |\n|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
