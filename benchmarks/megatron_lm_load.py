"""Megatron-LM's own loader on `reference convert ... --to megatron` outputs, with the command
lines the README documents, on the CPU under gloo. Not a test: Megatron-LM does not install from
the package registry, so this runs only when given a checkout of it (the release matching the
installed megatron-core, tag core_v0.16.1):

    python benchmarks/megatron_lm_load.py --megatron-lm /path/to/Megatron-LM [--only SUBSTRING]

For each case: tiny HF models (Llama with GQA, untied; Qwen3 with q/k norms, qkv bias, tied,
norm eps 1e-6 and a tokenizer smaller than its embedding) are converted to Megatron in both
`--ckpt-format`s; then, in fresh processes (1, or 2 at TP 2), Megatron-LM's `parse_args` reads
the command line a user would write (through `initialize_megatron`, which also applies
`--use-checkpoint-args`), the model is built by its `model_provider(gpt_builder)` as
pretrain_gpt.py builds it, and `megatron.training.checkpointing.load_checkpoint(model, None,
None)` loads the checkpoint. A case passes when its outcome is the one recorded for it: either
"loads" — strict load with no non-strict retry (Megatron-LM retries a failed strict load with
strict=False and only prints `load_return: ...`), `check_checkpoint_args` passes, the run's
model-defining args equal the checkpoint's, and the logits on a few tokens equal transformers'
(fp32, assert_close defaults; the padded vocabulary rows give 0) — or the error recorded.
Results and the commands are in docs/megatron-lm.md. Exit status 1 when any case differs.

The CUDA assumptions of megatron-core (reference.verify.cpu) and of Megatron-LM's training code
(its batch-invariant kernels, never enabled here, import Triton) are side-stepped inside the
child processes only, and put back after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The tiny models, and the flags that describe each to Megatron-LM as a user would write them.
SHAPE_FLAGS = ["--num-layers", "2", "--hidden-size", "72", "--ffn-hidden-size", "112",
               "--num-attention-heads", "6", "--group-query-attention", "--num-query-groups", "2",
               "--kv-channels", "16", "--seq-length", "64", "--max-position-embeddings", "64",
               "--position-embedding-type", "rope", "--no-position-embedding", "--rotary-base", "10000",
               "--normalization", "RMSNorm", "--swiglu"]
FAMILIES = {
    # model_type, tied, config overrides, tokenizer vocabulary, flags beyond SHAPE_FLAGS
    "llama": ("llama", False, {}, 250, ["--disable-bias-linear", "--untie-embeddings-and-output-weights"]),
    # Qwen3's tokenizer is smaller than its embedding (151669 vs 151936): here 120 vs 250, so the
    # tokenizer pads to 128 rows where the checkpoint has 256
    "qwen3": ("qwen3", True, {"rms_norm_eps": 1e-6}, 120,
              ["--add-qkv-bias", "--qk-layernorm", "--norm-epsilon", "1e-6"]),
}
# What every run needs on this machine and is no part of the recipe: gloo, the local spec (no
# TransformerEngine), no fused CUDA kernels, no dropout, weights initialised on the CPU.
CPU_FLAGS = ["--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
             "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
             "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--attention-dropout", "0",
             "--hidden-dropout", "0", "--micro-batch-size", "1"]
# Args that change what the model computes: after loading, the run's must equal the checkpoint's.
MODEL_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "normalization", "layernorm_epsilon", "swiglu", "add_bias_linear",
              "add_qkv_bias", "qk_layernorm", "position_embedding_type", "rotary_base", "rotary_percent",
              "use_rope_scaling", "untie_embeddings_and_output_weights", "padded_vocab_size")
# Megatron-LM before 0.16 named --norm-epsilon's value norm_epsilon (0.16: layernorm_epsilon).
EARLIER_NAME = {"layernorm_epsilon": "norm_epsilon"}
LOADS = "loads"


@dataclass
class Case:
    name: str
    family: str
    ckpt_format: str
    tp: int
    flags: list[str]  # after --load/--ckpt-format/--tokenizer-*, --tensor-model-parallel-size
    expect: str = LOADS  # or a piece of the error message
    ckpt_tp: int = 1  # the TP the checkpoint was converted at

    def argv(self, hf: Path, ckpt: Path) -> list[str]:
        return ["--load", str(ckpt), "--ckpt-format", self.ckpt_format, "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", str(hf),
                "--tensor-model-parallel-size", str(self.tp), *self.flags, *CPU_FLAGS]


def model_flags(family: str) -> list[str]:
    return [*SHAPE_FLAGS, *FAMILIES[family][4]]


def without(flags: list[str], *drop: str) -> list[str]:
    """`flags` less each flag in `drop` (with its value where it takes one)."""
    out, skip = [], False
    for i, f in enumerate(flags):
        if skip:
            skip = False
            continue
        if f in drop:
            skip = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            continue
        out.append(f)
    return out


NO_OPT_RNG = ["--no-load-optim", "--no-load-rng"]
CKPT_ARGS = ["--use-checkpoint-args", *NO_OPT_RNG]


def cases() -> list[Case]:
    """The command lines tried, each with the outcome recorded for it."""
    # torch_dist's RNG state is built with CUDA calls (get_rng_state): tried in the torch format only
    out = [Case("llama torch without --no-load-rng", "llama", "torch", 1,
                [*model_flags("llama"), "--no-load-optim"], expect="Unable to load rng state")]
    for fmt in ("torch", "torch_dist"):
        for tp in (1, 2):
            ckpt_tp = tp if fmt == "torch" else 1  # torch_dist is loaded at another TP as it is
            at = f"{fmt} tp{tp}"
            # Llama: the tokenizer's size is the config's, so the model flags alone suffice
            out += [Case(f"llama {at} --finetune", "llama", fmt, tp, [*model_flags("llama"), "--finetune"],
                         ckpt_tp=ckpt_tp),
                    Case(f"llama {at} --no-load-optim --no-load-rng", "llama", fmt, tp,
                         [*model_flags("llama"), *NO_OPT_RNG], ckpt_tp=ckpt_tp),
                    Case(f"llama {at} --use-checkpoint-args only", "llama", fmt, tp, CKPT_ARGS,
                         ckpt_tp=ckpt_tp),
                    # Qwen3: --use-checkpoint-args for the embedding's rows; it does not carry
                    # --qk-layernorm or --norm-epsilon over, so those are given
                    Case(f"qwen3 {at} --use-checkpoint-args --finetune", "qwen3", fmt, tp,
                         [*model_flags("qwen3"), "--use-checkpoint-args", "--finetune"], ckpt_tp=ckpt_tp),
                    Case(f"qwen3 {at} --use-checkpoint-args --qk-layernorm --norm-epsilon", "qwen3", fmt, tp,
                         [*CKPT_ARGS, "--qk-layernorm", "--norm-epsilon", "1e-6"], ckpt_tp=ckpt_tp)]
        # the documented flags left out, one at a time (TP 1)
        llama, qwen = model_flags("llama"), model_flags("qwen3")
        out += [
            Case(f"llama {fmt} without --no-position-embedding", "llama", fmt, 1,
                 [*without(llama, "--no-position-embedding"), *NO_OPT_RNG],
                 expect="add_position_embedding value from checkpoint (False) is not equal to the input "
                        "argument value (True)"),
            # loads: Megatron-LM skips check_checkpoint_args under --finetune; called here, it fails
            Case(f"llama {fmt} --finetune without --no-position-embedding", "llama", fmt, 1,
                 [*without(llama, "--no-position-embedding"), "--finetune"], expect="add_position_embedding"),
            Case(f"llama {fmt} without --no-load-optim", "llama", fmt, 1, [*llama, "--no-load-rng"]),
            # torch: a size mismatch; torch_dist loads the 256-row embedding into 128 rows without a
            # word, and the forward fails on the test's token ids >= 128
            Case(f"qwen3 {fmt} without --use-checkpoint-args", "qwen3", fmt, 1, [*qwen, *NO_OPT_RNG],
                 expect="size mismatch" if fmt == "torch" else "IndexError: index out of range"),
            # torch: the non-strict retry drops the q/k norms; torch_dist drops them without a word
            Case(f"qwen3 {fmt} --use-checkpoint-args only", "qwen3", fmt, 1, CKPT_ARGS,
                 expect="non-strict retry" if fmt == "torch"
                 else "qk_layernorm checkpoint True vs run False"),
            Case(f"qwen3 {fmt} --use-checkpoint-args --qk-layernorm, no --norm-epsilon", "qwen3", fmt, 1,
                 [*CKPT_ARGS, "--qk-layernorm"], expect="layernorm_epsilon checkpoint 1e-06 vs run 1e-05"),
        ]
    return out


# ---------------------------------------------------------------- preparation (parent process)

def prepare(work: Path) -> dict[str, Path]:
    """Tiny HF models with tokenizers, transformers' logits, and their Megatron conversions."""
    import torch

    from reference.tiny import golden_input, logits, tiny_model, tiny_tokenizer

    paths = {}
    for family, (model_type, tie, overrides, vocab, _) in FAMILIES.items():
        hf = work / family / "hf"
        if not hf.exists():
            model = tiny_model(model_type, tie=tie, **overrides)
            model.save_pretrained(hf)
            tiny_tokenizer(vocab).save_pretrained(hf)
            torch.save(logits(model, golden_input()), hf / "expected_logits.pt")
        paths[family] = hf
        for fmt, tp in (("torch", 1), ("torch", 2), ("torch_dist", 1)):
            out = work / family / f"{fmt}_tp{tp}"
            if not out.exists():
                subprocess.run([sys.executable, "-m", "reference", "convert", str(hf), str(out), "--to",
                                "megatron", "--ckpt-format", fmt, "--tp", str(tp)], check=True)
    return paths


# ---------------------------------------------------------------- one case (child processes)

# megatron.training.initialize imports these Triton kernels at import time; they run only under
# --batch-invariant-mode, which no case sets.
BATCH_INVARIANT = "megatron.core.transformer.custom_layers.batch_invariant_kernels"


@contextlib.contextmanager
def triton_absent_side_step() -> Iterator[None]:
    """Without Triton (no CPU wheel here), the batch-invariant kernels' module replaced by one
    whose `enable_batch_invariant_mode` refuses, while Megatron-LM's modules are imported; the
    entry removed from sys.modules again afterwards."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        yield
        return

    def enable_batch_invariant_mode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("--batch-invariant-mode needs Triton")

    stand_in = types.ModuleType(BATCH_INVARIANT)
    stand_in.enable_batch_invariant_mode = enable_batch_invariant_mode
    sys.modules[BATCH_INVARIANT] = stand_in
    try:
        yield
    finally:
        del sys.modules[BATCH_INVARIANT]


@contextlib.contextmanager
def cuda_tensors_on_cpu() -> Iterator[None]:
    """Megatron-LM's training code allocates small bookkeeping tensors on device='cuda' (the
    tracker's iteration all-reduced in read_metadata): made on the CPU instead, for gloo."""
    import torch

    made = {name: getattr(torch, name) for name in ("tensor", "zeros", "ones", "empty")}

    def on_cpu(make):
        def wrapper(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return make(*args, **kwargs)
        return wrapper

    for name, make in made.items():
        setattr(torch, name, on_cpu(make))
    try:
        yield
    finally:
        for name, make in made.items():
            setattr(torch, name, make)


def run_case(spec: dict) -> dict:
    """In a child process, one rank: Megatron-LM parses the argv, builds, loads, runs."""
    import torch
    import torch.distributed as dist

    from reference.tiny import golden_input
    from reference.verify.cpu import cpu_side_steps, te_side_steps

    sys.path.insert(0, spec["megatron_lm"])  # for model_provider.py and gpt_builders.py
    with triton_absent_side_step():
        from gpt_builders import gpt_builder
        from megatron.core import mpu
        from megatron.training import arguments, checkpointing, get_args, initialize
        from model_provider import model_provider

    result: dict = {"strict_false_calls": 0}
    sys.argv = ["pretrain_gpt.py", *spec["argv"]]
    # validate_args asks the GPU's architecture at TP > 1 (for CUDA_DEVICE_MAX_CONNECTIONS advice):
    # a Hopper's answer, with CUDA_DEVICE_MAX_CONNECTIONS=1 set as Megatron-LM's examples set it
    arch = arguments.get_device_arch_version
    arguments.get_device_arch_version = lambda: 9
    try:
        with cpu_side_steps(), te_side_steps(), cuda_tensors_on_cpu():
            # Megatron-LM's own start: parse_args, --use-checkpoint-args, validate_args, globals
            initialize.initialize_megatron(allow_no_cuda=True, skip_mpu_initialization=True)
            args = get_args()
            initialize._initialize_distributed(None, None, None)  # gloo, from --distributed-backend
            # it leaves model parallelism to CUDA machines: done here as it would do it
            mpu.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
            initialize._set_random_seed(args.seed)
            model = model_provider(gpt_builder, pre_process=True, post_process=True)
            loader = model.load_state_dict

            def recorded(state_dict, strict=True):  # the non-strict retry, counted
                result["strict_false_calls"] += not strict
                return loader(state_dict, strict=strict)

            model.load_state_dict = recorded
            iteration, _ = checkpointing.load_checkpoint([model], None, None)
            del model.load_state_dict
            result["iteration"] = iteration
            saved, *_ = checkpointing._load_base_checkpoint(args.load, args, rank0=True)
            ckpt_args = saved["args"]
            checkpointing.check_checkpoint_args(ckpt_args)  # load_checkpoint skips it under --finetune
            saved_value = {k: getattr(ckpt_args, k, getattr(ckpt_args, EARLIER_NAME.get(k, k), None))
                           for k in MODEL_ARGS}
            result["args_differ"] = {k: [v, getattr(args, k, None)] for k, v in saved_value.items()
                                     if v != getattr(args, k, None)}
            ids = golden_input()
            b, s = ids.shape
            mask = torch.triu(torch.ones(s, s), diagonal=1).bool()[None, None]
            model.eval()
            with torch.no_grad():
                local = model(ids, torch.arange(s).expand(b, s), attention_mask=mask)  # (b, s, vocab / tp)
            parts = [torch.empty_like(local) for _ in range(mpu.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, local.contiguous(), group=mpu.get_tensor_model_parallel_group())
            got = torch.cat(parts, dim=-1)
    finally:
        arguments.get_device_arch_version = arch
    want = torch.load(Path(spec["hf"]) / "expected_logits.pt")
    vocab = want.shape[-1]
    result["padded_rows_zero"] = bool(torch.equal(got[..., vocab:], torch.zeros_like(got[..., vocab:])))
    try:
        torch.testing.assert_close(got[..., :vocab], want)
        result["logits"] = f"equal (max |diff| {(got[..., :vocab] - want).abs().max().item():.1e})"
    except AssertionError as e:
        result["logits"] = "DIFFER: " + " ".join(str(e).split())[:300]
    return result


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    try:
        result = run_case(spec)
    except SystemExit as e:  # Megatron-LM exits after printing why
        result = {"error": f"sys.exit({e.code})"}
    except BaseException as e:  # noqa: BLE001 (the case's outcome, recorded)
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
    Path(spec["result"] + f".{rank}").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # leave without the gloo group's teardown, which may wait for a failed peer


# ---------------------------------------------------------------- the run (parent process)

@dataclass
class Outcome:
    case: Case
    outcome: str
    detail: str = ""
    ok: bool = False
    seconds: float = 0.0
    results: list = field(default_factory=list)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outcome_of(results: list[dict], log: str) -> str:
    """One line: "loads" only when every rank loaded strictly, agreed on args and logits."""
    for r in results:
        if "error" in r:
            lines = [ln.strip() for ln in log.splitlines()
                     if any(w in ln for w in ("Unable", "Error", "error", "assert", "mismatch"))]
            return r["error"] + (f" | {lines[-1]}" if lines and r["error"].startswith("sys.exit") else "")
    r = results[0]
    if any(x["strict_false_calls"] for x in results) or "load_return" in log:
        missing = [ln for ln in log.splitlines() if "load_return" in ln]
        return "non-strict retry: " + (missing[0][:300] if missing else "")
    if r["args_differ"]:
        return "args differ: " + ", ".join(f"{k} checkpoint {a!r} vs run {b!r}" for k, (a, b) in
                                             r["args_differ"].items()) + "; logits " + r["logits"][:120]
    if any(not x["logits"].startswith("equal") or not x["padded_rows_zero"] for x in results):
        return "logits " + r["logits"] + ("" if r["padded_rows_zero"] else "; padded rows not 0")
    return LOADS


def run(case: Case, mlm: Path, paths: dict[str, Path], work: Path, timeout_s: float) -> Outcome:
    hf = paths[case.family]
    ckpt = work / case.family / f"{case.ckpt_format}_tp{case.ckpt_tp}"
    tag = "".join(c if c.isalnum() else "_" for c in case.name)
    spec = {"megatron_lm": str(mlm), "hf": str(hf), "argv": case.argv(hf, ckpt),
            "result": str(work / "results" / tag)}
    (work / "results").mkdir(exist_ok=True)
    spec_path = work / "results" / f"{tag}.json"
    spec_path.write_text(json.dumps(spec))
    for rank in range(case.tp):
        Path(f"{spec['result']}.{rank}").unlink(missing_ok=True)
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(mlm), str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path,
           "WORLD_SIZE": str(case.tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    start = time.monotonic()
    logs = [open(work / "results" / f"{tag}.{rank}.log", "w+") for rank in range(case.tp)]  # noqa: SIM115
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], stdout=log,
                              stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank, log in enumerate(logs)]
    try:
        for p in procs:
            p.wait(timeout=max(timeout_s - (time.monotonic() - start), 1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
    seconds = time.monotonic() - start
    log = ""
    for f in logs:
        f.seek(0)
        log += f.read()
        f.close()
    results = []
    for rank in range(case.tp):
        path = Path(f"{spec['result']}.{rank}")
        results.append(json.loads(path.read_text()) if path.exists()
                       else {"error": "no result (hang or crash)"})
    outcome = outcome_of(results, log)
    ok = outcome == LOADS if case.expect == LOADS else case.expect in outcome and outcome != LOADS
    return Outcome(case, outcome, ok=ok, seconds=seconds, results=results)


def command_line(case: Case) -> str:
    """The case's Megatron-LM flags as a user would type them (paths and CPU flags shortened)."""
    argv = case.argv(Path("HF_DIR"), Path("MEGATRON_DIR"))
    return "pretrain_gpt.py " + " ".join(argv[:len(argv) - len(CPU_FLAGS)]) + " [CPU flags]"


def git_commit(mlm: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(mlm), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron-lm", type=Path, help="a checkout of Megatron-LM (tag core_v0.16.1)")
    p.add_argument("--workdir", type=Path, help="keep the models, checkpoints and logs here")
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
    p.add_argument("--timeout", type=float, default=600, help="seconds per case")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child)
        return 0
    if a.megatron_lm is None or not (a.megatron_lm / "megatron" / "training" / "checkpointing.py").exists():
        p.error("--megatron-lm must name a Megatron-LM checkout (megatron/training/checkpointing.py)")
    mlm = a.megatron_lm.resolve()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="megatron_lm_load."))
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work)
    print(f"Megatron-LM {git_commit(mlm)} at {mlm}; work in {work}", flush=True)
    outcomes = []
    for case in cases():
        if a.only not in case.name:
            continue
        o = run(case, mlm, paths, work, a.timeout)
        outcomes.append(o)
        mark = "ok  " if o.ok else "FAIL"
        print(f"{mark} {o.seconds:5.1f}s {case.name}: {o.outcome}"
              + ("" if o.ok else f"   (expected: {case.expect})"), flush=True)
    (work / "outcomes.json").write_text(json.dumps(
        [{**asdict(o.case), "command": command_line(o.case), "outcome": o.outcome, "ok": o.ok,
          "results": o.results} for o in outcomes], indent=1))
    bad = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(bad)} of {len(outcomes)} cases as recorded; "
          f"details in {work / 'outcomes.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
