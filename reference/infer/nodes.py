"""Several nodes under torchrun: each process (a node) runs its own workers on its share of
the rows; rank 0 checks the job first and, once every node has reported, merges the parts.

The nodes talk over a gloo group (torchrun's MASTER_ADDR / MASTER_PORT) only twice: rank 0
broadcasts whether the job may start, and all gather each node's outcome at the end. The
parts folder is shared storage; every row goes through it, never through the group. One
process per node is the intended shape (`--nproc-per-node 1`, `--devices` naming that node's
devices); more on one machine share its CPU cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from reference.infer.rows import Row


@dataclass(frozen=True)
class Node:
    """This process's place in the job: rank of world, and processes on this machine."""

    rank: int = 0
    world: int = 1
    local_world: int = 1

    @classmethod
    def from_env(cls) -> Node:
        """From the variables torchrun sets; one node when they are absent."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(env["RANK"]), world, int(env.get("LOCAL_WORLD_SIZE", "1")))


def share(rows: list[Row], node: Node) -> list[Row]:
    """This node's rows: every world-th of the rows sorted by length, so each node gets as
    many long prompts as short ones. It depends on the input only, so a rerun (or a restart
    by torchrun) gives each rank the same share, and each skips the ids it already did."""
    ordered = sorted(rows, key=lambda r: (-r.size, r.line))
    return ordered[node.rank::node.world]


class NodesLost(RuntimeError):
    """Another node did not report within the timeout, or its connection closed."""


class Group:
    """The two exchanges between nodes; with one node, each is the identity."""

    def __init__(self, node: Node, timeout_s: float) -> None:
        self.node, self.timeout_s = node, timeout_s

    def _exchange(self, call: Any, what: str) -> None:
        try:
            call()
        except RuntimeError as e:  # gloo raises its timeouts and closed connections as this
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NodesLost(f"node {self.node.rank} of {self.node.world}: no answer from the other nodes "
                            f"{what} within --node-timeout {self.timeout_s:g} s, or one of them is gone "
                            f"({text}); the committed rows are kept, rerun to resume") from None

    def broadcast(self, value: str | None) -> str | None:
        """Rank 0's `value` on every node."""
        if self.node.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        self._exchange(lambda: dist.broadcast_object_list(box, src=0), "at the start")
        return box[0]

    def gather(self, value: str | None) -> list[str | None]:
        """Every node's `value`, on every node: the barrier rank 0 waits at before merging."""
        if self.node.world == 1:
            return [value]
        import torch.distributed as dist

        box: list[str | None] = [None] * self.node.world
        self._exchange(lambda: dist.all_gather_object(box, value), "at the end of their shares")
        return box


@contextmanager
def group(node: Node, timeout_s: float) -> Iterator[Group]:
    """Join the nodes' gloo group for the job (nothing with one node), and leave it."""
    if node.world == 1:
        yield Group(node, timeout_s)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", rank=node.rank, world_size=node.world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield Group(node, timeout_s)
    finally:
        dist.destroy_process_group()
