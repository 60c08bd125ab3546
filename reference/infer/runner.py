"""Infer: split devices and cores among worker processes, hand out length-sorted batches as
workers ask for them, re-run the batch of a worker that died, merge the committed parts by id
into the output in input order. A rerun skips every id already committed. Under torchrun each
node does this for its share of the rows and rank 0 merges (nodes.py); `engine="ray"` hands
the rows to a Ray Data pipeline instead of local processes (ray_engine.py)."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import shutil
import sys
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference.errors import InputError, require
from reference.infer.nodes import Node, NodesLost, group, share
from reference.infer.rows import Row, check_manifest, file_sha256, read_done, read_rows, write_atomically
from reference.infer.worker import Job, first_line, main

BACKENDS = ("hf", "unified", "vllm")
ENGINES = ("local", "ray")


class WorkersFailed(RuntimeError):
    """Every worker has died or could not start; the committed rows are kept for a rerun."""


def plan_devices(devices: list[str] | None, workers: int) -> list[list[str]]:
    """Each worker's devices: an even split; or, with more workers than devices, each device
    shared by the same number of replicas (a small model leaves most of a GPU idle, and a second
    replica fills the gaps between the first one's kernel launches); or the CPU for all."""
    if workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    if not devices:
        return [["cpu"]] * workers
    n = len(devices)
    if n % workers == 0:
        k = n // workers
        return [devices[w * k:(w + 1) * k] for w in range(workers)]
    if workers % n == 0:
        return [[devices[w % n]] for w in range(workers)]
    raise InputError(f"--workers {workers} does not divide the {n} devices ({','.join(devices)}) "
                     f"nor is a multiple of them; give a worker count that divides them or that they divide")


def batches(rows: list[Row], size: int) -> list[list[Row]]:
    """Rows sorted by length into batches of `size`, longest first (the slow ones start early)."""
    ordered = sorted(rows, key=lambda r: (-r.size, r.line))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


@dataclass
class Infer:
    """Generate a continuation for every row of `data_path` into `output_path` with
    `num_workers` replicas; `.run()` returns the number of rows generated in this run."""

    model_path: str | Path
    data_path: str | Path
    output_path: str | Path
    num_workers: int
    devices: list[str] | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    backend: str = "hf"
    engine: str = "local"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    node_timeout_s: float = 86400.0

    def check(self) -> tuple[list[Row], list[list[str]]]:
        """Everything that can be refused, refused before any work."""
        if self.backend not in BACKENDS:
            raise InputError(f"backend {self.backend!r}: this build has {', '.join(BACKENDS)}")
        if self.engine not in ENGINES:
            raise InputError(f"engine {self.engine!r}: this build has {', '.join(ENGINES)}")
        if self.engine == "ray":
            if Node.from_env().world > 1:
                raise InputError("engine ray under torchrun: Ray spreads the work over its own cluster; "
                                 "run it as one process")
            require("ray", "ray")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise InputError("backend vllm needs vllm, which is not installed: pip install vllm "
                             "(it brings its own torch build)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise InputError("batch size and max new tokens must be at least 1")
        if not Path(self.model_path).is_dir():
            raise InputError(f"{self.model_path}: no such model directory")
        plan = plan_devices(self.devices, self.num_workers)
        return read_rows(Path(self.data_path)), plan

    def run(self) -> int:
        rows, plan = self.check()
        out = Path(self.output_path)
        parts = out.with_name(out.name + ".parts")
        node = Node.from_env()
        with group(node, self.node_timeout_s) as nodes:
            refused = None
            if node.rank == 0:  # one node checks the output and makes the folder; the others wait
                try:
                    self._prepare(out, parts)
                except InputError as e:
                    refused = str(e)
            refused = nodes.broadcast(refused)
            if refused:
                raise InputError(refused)
            mine = share(rows, node)
            done = read_done(parts, out)
            todo = [r for r in mine if r.key not in done]
            generated, failed = 0, None
            if todo:
                job = Job(str(self.model_path), self.backend, self.max_new_tokens, self.do_sample,
                          self.temperature, self.top_p, self.seed, str(parts), uuid.uuid4().hex[:12])
                try:
                    if self.engine == "ray":
                        generated = self._ray(job, plan, todo)
                    else:
                        generated = self._schedule(job, plan, batches(todo, self.batch_size), len(mine),
                                                   len(mine) - len(todo), node.local_world)
                except WorkersFailed as e:
                    failed = f"node {node.rank}: {e}" if node.world > 1 else str(e)
            try:
                failures = [f for f in nodes.gather(failed) if f]
            except NodesLost as e:
                raise WorkersFailed(str(e)) from None
            if failures:
                raise WorkersFailed("; ".join(failures))
        if node.rank == 0:
            self._merge(rows, out, parts)
        return generated

    def _prepare(self, out: Path, parts: Path) -> None:
        """Refuse an output of another job, else record this job beside it; make the parts folder."""
        manifest = {"data_sha256": file_sha256(Path(self.data_path)),
                    "model_path": str(Path(self.model_path).resolve()), "backend": self.backend,
                    "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                    "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        out.parent.mkdir(parents=True, exist_ok=True)
        check_manifest(out.with_name(out.name + ".manifest.json"), manifest, out)
        parts.mkdir(exist_ok=True)

    @staticmethod
    def _merge(rows: list[Row], out: Path, parts: Path) -> None:
        """Every row's committed result, in input order, into the output; then the parts go."""
        done = read_done(parts, out)
        missing = [r.id for r in rows if r.key not in done]
        if missing:
            raise WorkersFailed(f"{len(missing)} rows have no result (first: {missing[0]!r}); "
                                "rerun to resume")
        write_atomically(out, [json.dumps(done[r.key], ensure_ascii=False) for r in rows])
        shutil.rmtree(parts, ignore_errors=True)

    def _ray(self, job: Job, plan: list[list[str]], todo: list[Row]) -> int:
        from reference.infer.ray_engine import run_ray

        try:
            return run_ray(job, plan, todo, self.batch_size)
        except Exception as e:  # noqa: BLE001 - Ray raises its own types for a dead actor or task
            raise WorkersFailed(f"the Ray pipeline failed ({first_line(e)}); the committed rows are kept, "
                                "rerun to resume") from e

    def _schedule(self, job: Job, plan: list[list[str]], work: list[list[Row]], total: int,
                  already: int, processes_here: int = 1) -> int:
        """Run the workers until every batch is committed; returns the rows they committed."""
        from tqdm import tqdm

        ctx = multiprocessing.get_context("spawn")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        on_cpu = sum(devs[0] == "cpu" for devs in plan)
        threads = max(1, cores // max(on_cpu * processes_here, 1))  # torchrun may put several here
        inboxes = [ctx.Queue() for _ in plan]
        # One pipe per worker for its reports, written by its main thread: a worker that dies
        # mid-report breaks only its own pipe. (A shared Queue has one write lock for all its
        # writers, taken by a background thread; a worker killed while holding it silenced the
        # reports of every other worker, and the job waited for ever.)
        pipes = [ctx.Pipe(duplex=False) for _ in plan]
        procs = [ctx.Process(target=main, args=(w, devs, threads, job, inboxes[w], pipes[w][1]), daemon=True)
                 for w, devs in enumerate(plan)]
        for p in procs:
            p.start()
        for _, writer in pipes:
            writer.close()  # the workers hold the write ends now: a dead one's pipe reads as closed
        reports = {reader for reader, _ in pipes}
        pending = deque(enumerate(work))
        sizes = {b: len(rows) for b, rows in pending}
        held: dict[int, tuple[int, list[Row]] | None] = dict.fromkeys(range(len(procs)))
        idle: deque[int] = deque()  # workers waiting while nothing is pending: a dead one's rows may come
        finished: set[int] = set()  # batches committed
        gone: set[int] = set()  # workers that exited
        bar = tqdm(total=total, initial=already, unit="row", desc="infer", disable=not sys.stderr.isatty(),
                   dynamic_ncols=True)

        def hand_out() -> None:
            while idle and pending:
                w = idle.popleft()
                if w not in gone:
                    held[w] = pending.popleft()
                    inboxes[w].put(held[w])

        try:
            while len(finished) < len(work):
                for msg in receive(reports):
                    if msg[0] == "fatal":
                        raise WorkersFailed(f"worker {msg[1]} could not start: {msg[2]}")
                    if msg[0] == "done":
                        _, w, b, n = msg
                        held[w] = None
                        if b not in finished:
                            finished.add(b)
                            bar.update(n)
                    if msg[0] == "ready" and msg[1] not in gone:
                        idle.append(msg[1])
                for w, p in enumerate(procs):
                    if w in gone or p.exitcode is None:
                        continue
                    gone.add(w)
                    task, held[w] = held[w], None
                    if task is None or task[0] in finished:
                        continue
                    if (Path(job.parts) / f"{job.run_id}-{task[0]:06d}.jsonl").is_file():
                        finished.add(task[0])  # committed; the report was lost with the worker
                        bar.update(sizes[task[0]])
                        continue
                    bar.write(f"reference infer: worker {w} (pid {p.pid}) died (exit code {p.exitcode}) "
                              f"with {len(task[1])} rows unfinished; the other workers take them",
                              file=sys.stderr)
                    pending.appendleft(task)
                hand_out()
                if len(gone) == len(procs) and len(finished) < len(work):
                    raise WorkersFailed("every worker has died; the committed rows are kept, rerun to resume")
        finally:
            bar.close()
            for w, p in enumerate(procs):
                if p.exitcode is None:
                    inboxes[w].put(None)
            for p in procs:
                p.join(timeout=5)
                if p.exitcode is None:
                    p.kill()
            for reader in reports:
                reader.close()
        return sum(sizes[b] for b in finished)


def receive(reports: set[Any], timeout_s: float = 0.2) -> list[tuple]:
    """The reports waiting in the workers' pipes (after up to `timeout_s` for the first); a pipe
    whose worker has gone is dropped (the exit code tells the scheduler the rest)."""
    from multiprocessing.connection import wait

    messages = []
    for reader in wait(list(reports), timeout=timeout_s):
        try:
            while reader.poll():
                messages.append(reader.recv())
        except (EOFError, OSError):
            reports.discard(reader)
    return messages
