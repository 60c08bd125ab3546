"""Mixtures of experts: the unified model's forward beside transformers' experts implementations,
and the peak memory of converting a mixture as its expert count grows, in one run.

    python benchmarks/bench_moe.py [--repeat 5] [--convert-repeat 2] [--threads 1] [--workdir DIR]

- forward: qwen3_moe (8 experts) and mixtral (16 experts), hidden 512, 2 layers, top-2, vocab
  8000, fp32 and bf16, batch 1 x 256 and 4 x 512 tokens; the unified model (loaded from the HF
  directory by its own loader) against transformers' default experts implementation
  (`grouped_mm`, what `get_correct_experts_implementation` picks when none is asked for) and
  its eager loop (`experts_implementation="eager"`, what the equivalence tests pin). The three
  run round-robin in this process, --repeat times after a warm-up; each ratio is the median of
  the per-round ratios to the unified model's time of the same round. The fp32 logits of the
  unified model are checked against the eager loop's (assert_close, default tolerances).
  --threads torch threads (default 1: on a shared 2-core machine two OpenMP threads per process
  made one forward's time move by 5x from run to run).
- gather: what moe.py's gather of one expert's tokens costs as `x[token]` and as `index_select`.
- convert: a synthetic bf16 mixtral (hidden 1024, 4 layers, vocab 32000, 4 shards) with 8
  experts of 2048 and with 32 experts of 512 (the same bytes), converted to Megatron with
  --ep 2, to the unified format, and that Megatron checkpoint back to HF, each in its own
  process, beside `cp -r` of the same source; wall, data path and peak RSS as bench_convert.py
  measures them (its `measure_once`), --convert-repeat times round-robin. They run before the
  forward rows, while this process is still small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import measure_once, median  # noqa: E402

# family -> config fields of the CPU-sized forward model (on top of FORWARD_SHAPE)
FORWARD = {
    "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 512, "intermediate_size": 1024},
    "mixtral": {"num_local_experts": 16, "intermediate_size": 512},
}
FORWARD_SHAPE = {"vocab_size": 8000, "hidden_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "head_dim": 64, "num_experts_per_tok": 2,
                 "tie_word_embeddings": False}
BATCHES = [(1, 256), (4, 512)]
KINDS = ["unified", "transformers grouped_mm (default)", "transformers eager"]


def forward_rows(work: Path, repeat: int) -> list[list[str]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from reference.modeling import UnifiedForCausalLM
    from reference.tiny import fill

    rows = []
    g = torch.Generator().manual_seed(0)
    for family, fields in FORWARD.items():
        config = AutoConfig.for_model(family, **FORWARD_SHAPE, **fields)
        original = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fill(original, 0)
        original.save_pretrained(work / family)
        experts = fields.get("num_experts", fields.get("num_local_experts"))
        for dtype in (torch.float32, torch.bfloat16):
            default = AutoModelForCausalLM.from_pretrained(work / family, dtype=dtype).eval()
            impl = default.config._experts_implementation
            assert impl == "grouped_mm", f"transformers' default experts implementation is now {impl}"
            models = {KINDS[0]: UnifiedForCausalLM.from_pretrained(work / family, dtype=dtype),
                      KINDS[1]: default,
                      KINDS[2]: AutoModelForCausalLM.from_pretrained(work / family, dtype=dtype,
                                                                     experts_implementation="eager").eval()}
            for batch, seq in BATCHES:
                ids = torch.randint(0, FORWARD_SHAPE["vocab_size"], (batch, seq), generator=g)
                times: dict[str, list[float]] = {k: [] for k in models}
                out = {}
                with torch.no_grad():
                    for r in range(repeat + 1):  # round 0 is a warm-up
                        for kind, model in models.items():
                            start = time.perf_counter()
                            out[kind] = model(input_ids=ids).logits
                            if r:
                                times[kind].append(time.perf_counter() - start)
                if dtype == torch.float32:  # the same model, or the timing compares nothing
                    torch.testing.assert_close(out[KINDS[0]], out[KINDS[2]])
                ours = times[KINDS[0]]
                row = [family, str(experts), str(dtype).removeprefix("torch."), f"{batch} x {seq}"]
                row += [f"{median(times[k]) * 1000:.0f}" for k in KINDS]
                row += [f"{median([t / u for t, u in zip(times[k], ours, strict=True)]):.2f}x"
                        for k in KINDS[1:]]
                rows.append(row)
    return rows


def gather_rows(rounds: int = 5, calls: int = 200) -> list[list[str]]:
    """What moe.py's gather of one expert's tokens costs written as `x[token]` and as
    `index_select` (the same rows): 2048 tokens of 512, an expert's 512 of them."""
    import torch

    g = torch.Generator().manual_seed(0)
    token = torch.randperm(2048, generator=g)[:512].sort().values
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2048, 512, generator=g).to(dtype)
        ways = {"x[token]": lambda x=x: x[token], "index_select": lambda x=x: x.index_select(0, token)}
        assert torch.equal(ways["x[token]"](), ways["index_select"]())
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                for _ in range(calls):
                    way()
                times[name].append((time.perf_counter() - start) / calls)
        ratio = median([a / b for a, b in zip(times["x[token]"], times["index_select"], strict=True)])
        rows.append([str(dtype).removeprefix("torch."), *(f"{median(v) * 1e6:.0f}" for v in times.values()),
                     f"{ratio:.2f}x"])
    return rows


def mixtral_shapes(experts: int, expert_size: int, layers: int = 4, hidden: int = 1024,
                   vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """The HF file keys and shapes of a mixtral (GQA 8/2 heads of 128)."""
    kv = 2 * 128
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden),
                                          "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden),
                   p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.v_proj.weight": (kv, hidden),
                   p + "block_sparse_moe.gate.weight": (experts, hidden)}
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {q + "w1.weight": (expert_size, hidden), q + "w3.weight": (expert_size, hidden),
                       q + "w2.weight": (hidden, expert_size)}
    return shapes


def make_mixtral(path: Path, experts: int, expert_size: int) -> None:
    """A synthetic bf16 mixtral in 4 shards, its keys checked against transformers' own save."""
    import torch
    from transformers import MixtralConfig

    from reference.converters.safetensors_io import Planned, write_dir
    from reference.tiny import tiny_model

    config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=expert_size,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                           num_local_experts=experts, num_experts_per_tok=2, tie_word_embeddings=False,
                           dtype="bfloat16")
    # the key set transformers writes, from a tiny mixtral of 2 layers and 4 experts
    tiny = tiny_model("mixtral", num_hidden_layers=2, num_local_experts=4)
    with tempfile.TemporaryDirectory() as tmp:
        tiny.save_pretrained(tmp)
        from safetensors import safe_open

        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
            saved = set(f.keys())
    assert saved == set(mixtral_shapes(4, 8, layers=2)), "transformers writes other mixtral keys"
    shapes = mixtral_shapes(experts, expert_size)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    planned = [Planned(k, torch.bfloat16, s, lambda s=s: torch.randn(s, generator=gen).to(torch.bfloat16))
               for k, s in shapes.items()]
    write_dir(planned, path, max_bytes=sum(p.nbytes for p in planned) // 4 + 1)
    config.save_pretrained(path)


def timed(tiny: str, src: str, dst: str, to: str) -> None:
    """In a child: convert the tiny mixtral once (every import and lazy load), then time the
    real conversion; print (seconds, peak RSS in KiB before it), as measure_once reads it."""
    from reference.converters import convert
    from reference.converters.megatron import MegatronLayout

    def job(a: str, b: str, warm: bool) -> None:
        # the Megatron row reads the megatron output of the same round: its warm-up reads the
        # tiny one's, written by that row's own warm-up
        if to == "hf" and warm:
            convert(tiny, b + "-mg", to="megatron", layout=MegatronLayout(ep=2))
            a = b + "-mg"
        layout = MegatronLayout(ep=2) if to == "megatron" else None
        convert(a, b, to=to, layout=layout)

    warm = dst + "-warm"
    for p in (warm, warm + "-mg"):
        shutil.rmtree(p, ignore_errors=True)
    job(tiny, warm, True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    os.sync()
    start = time.perf_counter()
    job(src, dst, False)
    print(json.dumps([time.perf_counter() - start, before]))


def mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def convert_rows(work: Path, repeat: int) -> list[list[str]]:
    py = sys.executable
    tiny = work / "tiny"
    subprocess.run([py, __file__, "--make", str(tiny), "0", "0"], check=True)
    rows = []
    for experts, size in ((8, 2048), (32, 512)):
        src, mg = work / f"mixtral-{experts}", work / f"mg-{experts}"
        subprocess.run([py, __file__, "--make", str(src), str(experts), str(size)], check=True)

        def child(a: Path, b: Path, to: str) -> list[str]:
            return [py, __file__, "--timed", str(tiny), str(a), str(b), to]

        # (name, output, command, the cp -r row it is compared with)
        cases = [("cp -r (mixtral)", work / "cp", ["cp", "-r", str(src), str(work / "cp")],
                  "cp -r (mixtral)"),
                 ("mixtral -> megatron --ep 2", mg, child(src, mg, "megatron"), "cp -r (mixtral)"),
                 ("mixtral -> unified", work / "u", child(src, work / "u", "unified"), "cp -r (mixtral)"),
                 ("cp -r (that megatron)", work / "cpm", ["cp", "-r", str(mg), str(work / "cpm")],
                  "cp -r (that megatron)"),
                 ("megatron -> hf", work / "h", child(mg, work / "h", "hf"), "cp -r (that megatron)")]
        measure_once(cases[0][2], work / "cp")  # the source in the page cache for every row
        runs: dict[str, list[tuple[float, float, float, float]]] = {c[0]: [] for c in cases}
        for _ in range(repeat):
            for name, out, argv, _ in cases:
                runs[name].append(measure_once(argv, out))
        rank = max(f.stat().st_size for f in mg.rglob("model_optim_rng.pt")) / 2**20
        largest = max(math.prod(s) for s in mixtral_shapes(experts, size).values()) * 2 / 2**20  # bf16
        for name, _, _, baseline in cases:
            data = [r[1] for r in runs[name]]
            ratio = median([d / r[1] for d, r in zip(data, runs[baseline], strict=True)])
            rss, before = max(r[2] for r in runs[name]), max(r[3] for r in runs[name])
            wall = median([r[0] for r in runs[name]])
            rows.append([str(experts), f"{size}", f"{mib(src):.0f}", name, f"{wall:.2f}",
                         f"{median(data):.2f}", f"{ratio:.2f}x", f"{rss:.0f}", f"{max(rss - before, 0):.0f}",
                         f"{rank:.0f}", f"{largest:.1f}"])
        for p in (src, mg, work / "cp", work / "cpm", work / "u", work / "h"):
            shutil.rmtree(p, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="forward rounds after the warm-up")
    p.add_argument("--convert-repeat", type=int, default=2, help="conversion rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the forward rows")
    p.add_argument("--only", choices=["forward", "convert"], default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--make", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--timed", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.timed:
        timed(*args.timed)
        return
    if args.make:  # in a child, so that this process stays small for the conversion rows
        path, experts, size = args.make
        if experts == "0":
            from reference.tiny import save_tiny

            save_tiny("mixtral", Path(path))
        else:
            make_mixtral(Path(path), int(experts), int(size))
        return
    from reference.families.cli import table

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        # Conversions first: a child forked from this process once it holds the forward models
        # would start with their pages, and wait4's peak RSS would be theirs (1.9 GiB).
        if args.only != "forward":
            head = ["experts", "expert size", "source MiB", "command", "wall s", "data path s",
                    "vs cp of its source (paired median)", "peak RSS MiB", "RSS over import MiB",
                    "largest rank file MiB", "largest tensor MiB"]
            rows = convert_rows(work, args.convert_repeat)
            print(f"conversion, median of {args.convert_repeat}\n")
            print(table([head, *rows]) + "\n")
        if args.only != "convert":
            import torch

            torch.set_num_threads(args.threads)
            head = ["family", "experts", "dtype", "batch x seq", *(f"{k} ms" for k in KINDS),
                    "grouped_mm / unified", "eager / unified"]
            rows = forward_rows(work, args.repeat)
            print(f"forward, median of {args.repeat}, {args.threads} torch thread(s); "
                  "ratios above 1 mean the unified model is faster\n")
            print(table([head, *rows]))
            print(f"\ngathering one expert's tokens, median of 5 rounds of 200 calls, "
                  f"{args.threads} thread(s)\n")
            print(table([["dtype", "x[token] us", "index_select us", "x[token] / index_select"],
                         *gather_rows()]))


if __name__ == "__main__":
    main()
