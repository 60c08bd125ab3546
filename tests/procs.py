"""Launch real multi-process gloo jobs on 127.0.0.1, failing (not hanging) on a stuck rank."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range: a port the
    kernel hands out for outgoing connections (gloo opens many) could be taken again between
    this check and the rendezvous binding it."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")


def spawn(
    fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 60, method: str = "spawn"
) -> None:
    """Run `fn(rank, world, port, *args)` in `world` fresh processes; fail on error or hang.

    `fn` joins the group itself (`init_method=f"tcp://127.0.0.1:{port}"`), with a timeout so
    that a mismatched collective errors instead of waiting forever. `method="fork"` shares
    the parent's imports (megatron-core takes seconds per process to import on 2 cores).
    """
    import torch.multiprocessing as mp

    for attempt in range(3):
        port = free_port()
        ctx = mp.start_processes(_then_leave_together, args=(fn, world, port, *args), nprocs=world,
                                 join=False, start_method=method)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    pytest.fail(f"{fn.__name__}: ranks still running after {timeout_s} s (hang)")
            return
        except mp.ProcessRaisedException as e:
            # another job took the port between the check and the bind: a fresh port, not a bug
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


def _then_leave_together(rank: int, fn: Callable[..., None], world: int, port: int, *args: Any) -> None:
    """`fn`, then, if it left its process group up, a barrier and the group's teardown: a rank
    that exits while a peer's gloo threads still talk to it makes that peer abort ("terminate
    called without an active exception", seen in about 1 run in 8 of the ring tests)."""
    import torch.distributed as dist

    fn(rank, world, port, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def join_gloo(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    """In a spawned rank: one thread, then join the gloo group at 127.0.0.1:`port`, with a
    timeout so that a mismatched collective errors instead of waiting forever."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
