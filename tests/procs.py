"""Launch real multi-process gloo jobs on 127.0.0.1, failing (not hanging) on a stuck rank."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 60, method: str = "spawn"
) -> None:
    """Run `fn(rank, world, port, *args)` in `world` fresh processes; fail on error or hang.

    `fn` joins the group itself (`init_method=f"tcp://127.0.0.1:{port}"`), with a timeout so
    that a mismatched collective errors instead of waiting forever. `method="fork"` shares
    the parent's imports (megatron-core takes seconds per process to import on 2 cores).
    """
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__}: ranks still running after {timeout_s} s (hang)")


def join_gloo(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    """In a spawned rank: one thread, then join the gloo group at 127.0.0.1:`port`, with a
    timeout so that a mismatched collective errors instead of waiting forever."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
