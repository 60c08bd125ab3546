"""The unified model beside the family's own transformers class, on the same weights, in one run.

    python benchmarks/bench_unified.py [--layers 8] [--repeat 5] [--workdir DIR]

- load: wall of `from_pretrained` on the ~1 GB synthetic bf16 Llama checkpoint of
  bench_convert, and of it plus a one-token forward (which touches every weight: both loaders
  map the files lazily), with peak RSS over the import (each in its own process, after a
  warm-up on a tiny model so that imports are not timed; the checkpoint is in the page cache);
- forward: fp32, batch 4 x 256 tokens, sdpa (each library's default), median of --repeat;
- greedy: `generate()` of 128 new tokens at batch 1 and 8 (the unified model inherits
  transformers' GenerationMixin; stream_generate is separate work), tokens/s, median.
Forward and greedy run on a CPU-sized Llama (hidden 512, 4 layers, vocab 32000) in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import make_checkpoint, median  # noqa: E402


def load_child(kind: str, tiny: str, src: str) -> None:
    """In a child: warm up on the tiny model, then time the real load; print (s, MiB over import)."""
    import resource

    import torch

    def load(path: str) -> torch.nn.Module:
        if kind == "unified":
            from reference.modeling import UnifiedForCausalLM

            return UnifiedForCausalLM.from_pretrained(path)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    with torch.no_grad():
        load(tiny)(input_ids=torch.tensor([[1]]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = load(src)
    loaded = time.perf_counter() - start
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():  # touches every weight: what a lazy load left for later is paid here
        model(input_ids=torch.tensor([[1]]))
    first = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps([loaded, first, (after - before) / 1024]))


def load_rows(work: Path, layers: int, repeat: int) -> list[list[str]]:
    from reference.tiny import tiny_model

    src, tiny = work / f"llama-{layers}", work / "tiny"
    if not src.exists():
        make_checkpoint(src, layers)
    if not tiny.exists():
        tiny_model("llama").to(__import__("torch").bfloat16).save_pretrained(tiny)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20
    runs: dict[str, list[tuple[float, float, float]]] = {"unified": [], "transformers": []}
    for _ in range(repeat):
        for kind in runs:
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(tiny), str(src)],
                                 capture_output=True, text=True, check=True)
            runs[kind].append(tuple(json.loads(out.stdout.strip().splitlines()[-1])))
    rows = []
    for kind, values in runs.items():
        rows.append([f"load {size:.0f} MiB bf16 ({layers} layers)", kind,
                     f"{median([v[0] for v in values]):.2f} s", "-"])
        rows.append(["load + first token", kind, f"{median([v[1] for v in values]):.2f} s",
                     f"{median([v[2] for v in values]):.0f} MiB"])
    return rows


def compute_rows(work: Path, repeat: int) -> list[list[str]]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from reference.modeling import UnifiedForCausalLM
    from reference.tiny import fill

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, eos_token_id=None)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fill(original, 0)
    original.save_pretrained(work / "small")
    models = {"unified": UnifiedForCausalLM.from_pretrained(work / "small"),
              "transformers": AutoModelForCausalLM.from_pretrained(work / "small").eval()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (4, 256), generator=g)
    rows = []
    for kind, model in models.items():
        times = []
        for _ in range(repeat + 1):
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids)
            times.append(time.perf_counter() - start)
        rows.append(["forward 4 x 256 fp32", kind, f"{median(times[1:]) * 1000:.0f} ms", "-"])
    for batch in (1, 8):
        prompt = torch.randint(0, 32000, (batch, 16), generator=g)
        outs = {}
        for kind, model in models.items():
            times = []
            for _ in range(max(1, repeat // 2)):
                start = time.perf_counter()
                outs[kind] = model.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)
                times.append(time.perf_counter() - start)
            rate = f"{batch * 128 / median(times):.0f} tok/s"
            rows.append([f"greedy batch {batch}, 128 new", kind, rate, "-"])
        assert torch.equal(outs["unified"], outs["transformers"]), "greedy outputs differ"
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        load_child(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = load_rows(work, args.layers, args.repeat) + compute_rows(work, args.repeat)
    print(f"torch threads: {os.cpu_count()} cores\n")
    print("| what | model | time or rate | RSS over import |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
