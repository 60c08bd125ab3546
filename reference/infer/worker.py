"""One worker process: load a replica, take batches from the parent, commit each batch's rows
as one part file (atomically), report it. A row that fails alone gets an `error`, not the job.

Fault injection for the tests, through the environment (read here only):
REFERENCE_INFER_TEST_COUNT=PATH   append each row id to PATH as it is generated;
REFERENCE_INFER_TEST_EXIT=N       the first worker to generate N rows calls os._exit(3) before
                                  committing them (once per job: a marker in the parts folder);
REFERENCE_INFER_TEST_HANG=N       every worker sleeps for good after committing N parts.
"""

from __future__ import annotations

import json
import os
import queue
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference.infer.rows import Row, row_seed, write_atomically


@dataclass(frozen=True)
class Job:
    """What every worker needs, picklable."""

    model_path: str
    backend: str
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int
    parts: str
    run_id: str


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class Replica:
    """A model and its tokenizer on this worker's devices, seen only through generation."""

    def __init__(self, job: Job, devices: list[str]) -> None:
        import torch
        from transformers import AutoTokenizer

        self.job, self.torch = job, torch
        self.tokenizer = AutoTokenizer.from_pretrained(job.model_path, local_files_only=True)
        if job.backend == "vllm":
            from transformers import AutoConfig

            from reference.infer.vllm_backend import load

            self.model = load(job.model_path, devices)
            config = AutoConfig.from_pretrained(job.model_path, local_files_only=True)
        elif job.backend == "unified":
            from reference.modeling import UnifiedForCausalLM

            self.model = UnifiedForCausalLM.from_pretrained(job.model_path)
            if devices != ["cpu"]:
                self.model.set_device(devices)
            config = self.model.config
        else:
            from transformers import AutoModelForCausalLM

            if len(set(devices)) > 1:
                raise ValueError(f"backend hf holds a replica on one device, not {','.join(devices)}; "
                                 "use --backend unified to spread one over several")
            self.model = AutoModelForCausalLM.from_pretrained(job.model_path, local_files_only=True)
            self.model.to(devices[0])
            config = self.model.config
        if job.backend != "vllm":
            self.model.eval()
        self.device = devices[0]
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.limit = getattr(config, "max_position_embeddings", None)

    def encode(self, row: Row) -> list[int]:
        if row.messages is not None:
            text = self.tokenizer.apply_chat_template(row.messages, tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(row.prompt)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        """The continuation up to (not including) the first eos."""
        cut = next((i for i, t in enumerate(tokens) if t in self.eos), len(tokens))
        return self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)

    def generate(self, encoded: list[list[int]], seeds: list[int] | None) -> list[str]:
        """Greedy (or seeded sampling, a seed per row) continuations of left-padded prompts;
        hf and unified take one seed for the whole batch, so they are given one row at a time."""
        job = self.job
        if job.backend == "vllm":
            from reference.infer.vllm_backend import generate

            new_tokens = generate(self.model, encoded, seeds, job.max_new_tokens, job.do_sample,
                                  job.temperature, job.top_p)
            return [self.decode(tokens) for tokens in new_tokens]
        torch = self.torch
        seed = seeds[0] if seeds else None
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[self.pad] * (width - len(x)) + x for x in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=self.device)
        with torch.no_grad():
            if job.backend == "unified":
                steps = self.model.stream_generate(
                    ids, attention_mask=mask, max_new_tokens=job.max_new_tokens,
                    eos_token_id=sorted(self.eos) or None,
                    do_sample=job.do_sample, temperature=job.temperature, top_p=job.top_p, seed=seed)
                new = torch.stack(list(steps), dim=1)
            else:
                if seed is not None:
                    torch.manual_seed(seed)
                sampling = {"do_sample": True, "temperature": job.temperature, "top_p": job.top_p} \
                    if job.do_sample else {"do_sample": False}
                out = self.model.generate(ids, attention_mask=mask, max_new_tokens=job.max_new_tokens,
                                          pad_token_id=self.pad, eos_token_id=sorted(self.eos) or None,
                                          **sampling)
                new = out[:, width:]
        return [self.decode(row.tolist()) for row in new]

    def run(self, rows: list[Row]) -> list[dict]:
        """One result per row: `output`, or `error` for a row that failed on its own."""
        results: dict[int, dict] = {}
        encoded: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            try:
                ids = self.encode(row)
            except Exception as e:  # noqa: BLE001 - one bad row must not kill the batch
                results[i] = {"id": row.id, "error": first_line(e)}
                continue
            if not ids:
                results[i] = {"id": row.id, "error": "the prompt encodes to no tokens"}
            elif self.limit and len(ids) + self.job.max_new_tokens > self.limit:
                results[i] = {"id": row.id, "error": f"too long: {len(ids)} prompt tokens + max_new_tokens "
                                                     f"{self.job.max_new_tokens} > the model's {self.limit} "
                                                     "positions"}
            else:
                encoded[i] = ids
        if self.job.do_sample and self.job.backend != "vllm":  # a row at a time, seeded by its id:
            groups = [[i] for i in encoded]  # the same text in any batch (vLLM seeds each request)
        else:
            groups = [list(encoded)] if encoded else []
        for group in groups:
            try:
                seeds = [row_seed(self.job.seed, rows[i].id) for i in group] if self.job.do_sample else None
                texts = self.generate([encoded[i] for i in group], seeds)
                pairs = list(zip(group, texts, strict=True))
            except Exception:  # noqa: BLE001 - find the row at fault: each alone
                pairs = []
                for i in group:
                    try:
                        one = [row_seed(self.job.seed, rows[i].id)] if self.job.do_sample else None
                        pairs.append((i, self.generate([encoded[i]], one)[0]))
                    except Exception as e:  # noqa: BLE001
                        results[i] = {"id": rows[i].id, "error": first_line(e)}
            for i, text in pairs:
                results[i] = {"id": rows[i].id, "output": text}
        _count([rows[i] for i in encoded])
        return [results[i] for i in range(len(rows))]


def _count(rows: list[Row]) -> None:
    path = os.environ.get("REFERENCE_INFER_TEST_COUNT")
    if path and rows:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r.id) + "\n" for r in rows))


def _first(marker: Path) -> bool:
    """Whether this process is the first to claim `marker` (created exclusively)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def main(worker: int, devices: list[str], threads: int, job: Job, inbox: Any, outbox: Any) -> None:
    """The worker loop: ask for a batch, generate, commit the part, report; None ends it."""
    parent = os.getppid()
    try:
        import torch
        from transformers.utils import logging

        torch.set_num_threads(threads)
        logging.disable_progress_bar()  # one bar, the parent's
        replica = Replica(job, devices)
    except Exception as e:  # noqa: BLE001 - the parent reports it and stops the job
        outbox.send(("fatal", worker, first_line(e), traceback.format_exc()))
        return
    exit_after = int(os.environ.get("REFERENCE_INFER_TEST_EXIT", "0")) or None
    hang_after = int(os.environ.get("REFERENCE_INFER_TEST_HANG", "0")) or None
    generated = committed = 0
    outbox.send(("ready", worker))
    while True:
        try:
            task = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent is gone: nobody would merge our parts
                return
            continue
        if task is None:
            return
        batch, rows = task
        results = replica.run(rows)
        generated += len(rows)
        if exit_after is not None and generated >= exit_after and _first(Path(job.parts) / ".test-exit"):
            os._exit(3)
        part = Path(job.parts) / f"{job.run_id}-{batch:06d}.jsonl"
        write_atomically(part, [json.dumps(r) for r in results])
        committed += 1
        if hang_after is not None and committed >= hang_after:
            while True:
                time.sleep(60)
        outbox.send(("done", worker, batch, len(rows)))
        outbox.send(("ready", worker))
