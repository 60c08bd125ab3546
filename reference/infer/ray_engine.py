"""`engine="ray"`: the rows still to do as a Ray Data pipeline, one actor per replica.

Each actor holds a `Replica` and, like a local worker, commits every batch it generates as one
part file (atomically) before returning it; the runner merges the parts by id, as for the
local engine, so order, resume and the exactly-once check are the same code. A row goes into
the pipeline as one JSON string: its id may be an int in one row and a string in the next,
which an Arrow column cannot hold. Ray is joined if `ray.init()` was called already (or
RAY_ADDRESS names a cluster); otherwise a local one is started for the job and stopped after.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

from reference.infer.rows import Row, write_atomically
from reference.infer.worker import Job, Replica


class RayReplica:
    """The callable class Ray Data runs in each actor of the pool."""

    def __init__(self, job: Job, devices: list[str], threads: int) -> None:
        import torch
        from transformers.utils import logging

        torch.set_num_threads(threads)
        logging.disable_progress_bar()
        self.job, self.replica = job, Replica(job, devices)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = [Row(**json.loads(text)) for text in batch["row"]]
        results = self.replica.run(rows)
        name = f"{self.job.run_id}-ray-{rows[0].line:06d}-{uuid.uuid4().hex[:8]}.jsonl"
        write_atomically(Path(self.job.parts) / name, [json.dumps(r) for r in results])
        return {"id": [json.dumps(r["id"]) for r in results]}


def run_ray(job: Job, plan: list[list[str]], todo: list[Row], batch_size: int) -> int:
    """Generate `todo` on len(plan) actors; returns the rows committed."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        devices = plan[0]
        sharing = plan.count(devices)  # replicas per device when there are more workers than devices
        gpus = len(devices) / sharing if devices[0].startswith("cuda") else 0
        # Ray sets each actor's CUDA_VISIBLE_DEVICES to the GPUs it grants: they count from 0 there
        local = [f"cuda:{i}" for i in range(len(devices))] if gpus else ["cpu"]
        ordered = sorted(todo, key=lambda r: (-r.size, r.line))  # long rows first, as the local engine
        ds = ray.data.from_items([{"row": json.dumps(dataclasses.asdict(r))} for r in ordered])
        ds = ds.map_batches(RayReplica, fn_constructor_args=(job, local, 1), batch_size=batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=len(plan)),
                            num_cpus=1, num_gpus=gpus)
        return sum(len(batch["id"]) for batch in ds.iter_batches(batch_size=None, batch_format="numpy"))
    finally:
        if started:
            ray.shutdown()
