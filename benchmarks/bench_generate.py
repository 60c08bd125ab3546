"""stream_generate beside transformers' generate(), on the same weights, in one run.

    python benchmarks/bench_generate.py [--repeat 3]

Greedy decoding of 128 new tokens after a 16-token prompt, CPU fp32, batch 1 and 8, on a
CPU-sized Llama (hidden 512, 4 layers, GQA 8/2, vocab 32000, no eos so every run makes all 128):
tokens/s over the whole call and time to first token (stream_generate: its first yield;
generate(): the streamer's first put after the prompt's), median of --repeat after one warm-up
call of 4 tokens each. The two outputs are checked equal token for token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

NEW, PROMPT, WARM = 128, 16, 4


def run_stream(model, prompt, new: int = NEW) -> tuple[float, float, object]:  # noqa: ANN001
    import torch

    start = time.perf_counter()
    first, tokens = None, []
    for step in model.stream_generate(prompt, max_new_tokens=new):
        first = first or time.perf_counter() - start
        tokens.append(step)
    return first, time.perf_counter() - start, torch.stack(tokens, dim=1)


def run_generate(model, prompt, new: int = NEW) -> tuple[float, float, object]:  # noqa: ANN001
    from transformers.generation.streamers import BaseStreamer

    class First(BaseStreamer):
        """Notes when the first generated tokens arrive (the first put is the prompt)."""

        def __init__(self) -> None:
            self.puts, self.at = 0, None

        def put(self, value) -> None:  # noqa: ANN001
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    streamer = First()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer)
    return streamer.at - start, time.perf_counter() - start, out[:, prompt.shape[1]:]


def rows(work: Path, repeat: int) -> list[list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from reference.modeling import UnifiedForCausalLM
    from reference.tiny import fill

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, eos_token_id=None,
                         pad_token_id=0)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fill(original, 0)
    original.save_pretrained(work / "small")
    unified = UnifiedForCausalLM.from_pretrained(work / "small")
    hf = AutoModelForCausalLM.from_pretrained(work / "small").eval()
    g = torch.Generator().manual_seed(0)
    out = []
    for batch in (1, 8):
        prompt = torch.randint(1, 32000, (batch, PROMPT), generator=g)
        results = {}
        for kind, call in (("stream_generate", lambda p, n=NEW: run_stream(unified, p, n)),
                           ("transformers generate()", lambda p, n=NEW: run_generate(hf, p, n))):
            call(prompt, WARM)  # warm-up: a few tokens
            runs = [call(prompt) for _ in range(repeat)]
            results[kind] = runs[-1][2]
            first = statistics.median(r[0] for r in runs)
            rate = batch * NEW / statistics.median(r[1] for r in runs)
            out.append([f"greedy batch {batch}, {NEW} new", kind, f"{rate:.0f} tok/s",
                        f"{first * 1000:.0f} ms"])
        assert torch.equal(results["stream_generate"], results["transformers generate()"]), "outputs differ"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = rows(Path(tmp), args.repeat)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n",
          file=sys.stderr)
    print("| what | model | tokens/s | time to first token |\n|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
