"""Sequence parallelism over a torch.distributed group, wrapped around attention: the model stays
as it is, each block's attention kernel is replaced by one that talks to the other ranks.

Each rank holds the contiguous slice of the sequence that `torch.tensor_split(seq, n)` gives it
(the ranks learn the full length from each other at every forward). The trunk asks
`SequenceParallel.positions` for the global positions of that slice, so rope, masks, windows and
ALiBi are those of the whole sequence; everything outside attention is per position and needs
no communication.

- ulysses: one all-to-all turns sequence shards of q, k and v into head shards of the whole
  sequence, the chosen kernel runs on them, and one all-to-all turns the output back. KV heads
  are repeated up to a multiple of the degree when the degree does not divide them.
- ring: each rank keeps its queries; the K/V blocks go round the ring (send to the next rank,
  receive from the previous), each block's attention is merged into the running output by
  log-sum-exp. The causal load is not balanced: rank r computes r + 1 useful blocks of n.

Both are differentiable: the all-to-all and the ring pass are autograd Functions whose backward
is the same communication the other way.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from reference.families.spec import ModelSpec
from reference.modeling import attention

MODES = ("ulysses", "ring")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over flat tensors with per-rank sizes; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None):  # noqa: ANN001, ANN205
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        out = grad.new_empty(sum(ctx.send))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class _RingPass(torch.autograd.Function):
    """Send x to rank `to`, receive a tensor of `shape` from rank `frm` (global ranks); backward
    sends the gradient to `frm` and receives x's gradient from `to`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...], to: int, frm: int,  # noqa: ANN001, ANN205
                group: dist.ProcessGroup | None):
        ctx.shape, ctx.to, ctx.frm, ctx.group = x.shape, to, frm, group
        return _exchange(x.contiguous(), x.new_empty(shape), to, frm, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        out = _exchange(grad.contiguous(), grad.new_empty(ctx.shape), ctx.frm, ctx.to, ctx.group)
        return out, None, None, None, None


def _exchange(send: torch.Tensor, recv: torch.Tensor, to: int, frm: int,
              group: dist.ProcessGroup | None) -> torch.Tensor:
    ops = [dist.P2POp(dist.isend, send, to, group), dist.P2POp(dist.irecv, recv, frm, group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return recv


class SequenceParallel:
    """The group, the mode and this forward's shard lengths, shared by every layer's kernel."""

    def __init__(self, group: dist.ProcessGroup | None, mode: str, spec: ModelSpec) -> None:
        self.group, self.mode, self.spec = group, mode, spec
        self.degree, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.lengths: list[int] = []

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def positions(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(this slice's positions, the queries' positions the kernel sees, every key's position),
        after learning every rank's length; the slices must be those of torch.tensor_split."""
        lengths = [torch.zeros(1, dtype=torch.long) for _ in range(self.degree)]
        dist.all_gather(lengths, torch.tensor([t]), group=self.group)
        self.lengths = [int(n) for n in lengths]
        total = sum(self.lengths)
        expected = [len(c) for c in torch.tensor_split(torch.arange(total), self.degree)]
        if self.lengths != expected:
            raise ValueError(f"sequence parallel: the ranks hold {self.lengths} positions; a sequence of "
                             f"{total} is split as torch.tensor_split splits it: {expected}")
        start = sum(self.lengths[: self.rank])
        own, keys = torch.arange(start, start + t, device=device), torch.arange(total, device=device)
        return own, keys if self.mode == "ulysses" else own, keys


def _kv_repeats(kv: int, degree: int) -> int:
    """How often each KV head is repeated so that the degree divides them (1 when it does)."""
    return math.lcm(kv, degree) // kv


class Ulysses(nn.Module):
    """Attention on head shards of the whole sequence, between two all-to-alls."""

    def __init__(self, sp: SequenceParallel) -> None:
        super().__init__()
        self.sp = sp

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, c, T_rank, D) sequence shard -> (B, c, S, D) head shard: chunk j of the heads
        goes to rank j, which concatenates what it gets in rank order."""
        b, n, c, t, d = x.shape
        send = [b * c * t * d] * n
        recv = [b * c * length * d for length in self.sp.lengths]
        flat = _AllToAll.apply(x.transpose(0, 1).reshape(-1), send, recv, self.sp.group)
        pieces = zip(flat.split(recv), self.sp.lengths, strict=True)
        return torch.cat([p.view(b, c, length, d) for p, length in pieces], 2)

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, S, D) head shard -> (B, n * c, T_rank, D): the inverse of _to_heads."""
        b, c, _, d = x.shape
        n, t = self.sp.degree, self.sp.lengths[self.sp.rank]
        send = [b * c * length * d for length in self.sp.lengths]
        flat = torch.cat([p.reshape(-1) for p in x.split(self.sp.lengths, dim=2)])
        out = _AllToAll.apply(flat, send, [b * c * t * d] * n, self.sp.group)
        return out.view(n, b, c, t, d).transpose(0, 1).reshape(b, n * c, t, d)

    def forward(self, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, scale: float,
                softcap: float | None) -> tuple[torch.Tensor, None]:
        n, h = self.sp.degree, q.shape[1]
        repeats = _kv_repeats(k.shape[1], n)
        k, v = attention.repeat_kv(k, repeats), attention.repeat_kv(v, repeats)
        kv = k.shape[1]
        b, _, t, d = q.shape
        # one all-to-all for q, k and v: rank j gets heads chunk j of each
        packed = torch.cat([y.view(b, n, -1, t, d) for y in (q, k, v)], 2)  # (B, n, (H + 2KV) / n, T, D)
        q, k, v = self._to_heads(packed).split([h // n, kv // n, kv // n], 1)  # (B, heads / n, S, D)
        if mask is not None and mask.shape[1] != 1:  # per-head (ALiBi): this rank's heads
            mask = mask[:, self.sp.rank * (h // n): (self.sp.rank + 1) * (h // n)]
        out, _ = attention.KERNELS[backend](q, k, v, mask, scale, softcap)  # (B, H / n, S, D)
        return self._to_sequence(out), None


class Ring(nn.Module):
    """Attention of this rank's queries over K/V blocks passed round the ring, merged by
    log-sum-exp; the scores as the eager kernel computes them (softcap, then the mask)."""

    def __init__(self, sp: SequenceParallel) -> None:
        super().__init__()
        self.sp = sp

    def forward(self, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, scale: float,
                softcap: float | None) -> tuple[torch.Tensor, None]:
        sp = self.sp
        n, rank, lengths = sp.degree, sp.rank, sp.lengths
        starts = [sum(lengths[:j]) for j in range(n)]
        to, frm = sp.global_rank((rank + 1) % n), sp.global_rank((rank - 1) % n)
        groups = q.shape[1] // k.shape[1]
        block = torch.stack([k, v])  # (2, B, KV, T_src, D), first this rank's own
        out = lse = None
        for step in range(n):
            src = (rank - step) % n
            if step:
                shape = (*block.shape[:3], lengths[src], block.shape[4])
                block = _RingPass.apply(block, shape, to, frm, sp.group)
            kb, vb = attention.repeat_kv(block[0], groups), attention.repeat_kv(block[1], groups)
            scores = attention.tanh_softcap(torch.matmul(q, kb.transpose(2, 3)) * scale, softcap)
            scores = (scores + mask[..., starts[src]: starts[src] + lengths[src]]).float()  # (B, H, T, T_src)
            block_lse = torch.logsumexp(scores, -1, keepdim=True)
            block_out = torch.matmul(torch.exp(scores - block_lse), vb.float())
            if out is None:
                out, lse = block_out, block_lse
            else:
                merged = torch.logaddexp(lse, block_lse)
                out = out * torch.exp(lse - merged) + block_out * torch.exp(block_lse - merged)
                lse = merged
        return out.to(q.dtype), None


def enable(model: nn.Module, group: dist.ProcessGroup | None, mode: str) -> None:
    """Wrap every block's attention kernel for `mode` over `group` (None: the default group);
    what does not combine is refused here, before any work."""
    if mode not in MODES:
        raise ValueError(f"sequence parallel mode {mode!r} is not one of {', '.join(MODES)}")
    if not dist.is_initialized():
        raise RuntimeError("sequence parallel needs torch.distributed initialised (init_process_group) first")
    spec: ModelSpec = model.spec
    degree = dist.get_world_size(group)
    if mode == "ulysses" and spec.num_heads % degree:
        raise ValueError(f"ulysses sequence parallel: {spec.num_heads} attention heads are not divisible by "
                         f"the degree {degree}; use a degree that divides them, or mode='ring'")
    if spec.long_context_scaling is not None:
        raise ValueError("sequence parallel does not combine with long_context_scaling (Qwen v1's log-n "
                         "attention and dynamic NTK): they are computed from the local length")
    sp = SequenceParallel(group, mode, spec)
    for layer in model.layers:
        layer.attn.kernel = Ulysses(sp) if mode == "ulysses" else Ring(sp)
    model._sequence_parallel = sp
