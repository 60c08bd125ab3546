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
- ring: the positions are first re-sharded (one all-to-all) to the zigzag layout: the sequence in
  2n chunks, rank r holding chunks r and 2n-1-r, so that under a causal mask every rank has the
  same work (on contiguous slices, rank r would have r + 1 useful blocks of n). Each rank keeps its
  queries; the K/V blocks go round the ring (send to the next rank, receive from the previous),
  each pair of a query chunk and a key chunk with any key at or before a query is attended to
  (the others are skipped) and merged into that chunk's output by log-sum-exp; one all-to-all
  takes the output back to the contiguous slices.

A padding attention_mask is passed sliced like the sequence; the ranks gather the whole of it at
every forward (also when none is given, so that every rank makes the same collectives).

q/k and v may have head dims of their own (MLA): Ulysses sends v in an all-to-all of its own, the
ring packs each position's heads along the last dim.

Both are differentiable: the all-to-all and the ring pass are autograd Functions whose backward
is the same communication the other way (so the re-shard's backward is the inverse re-shard).
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
        expected = [len(r) for r in split(total, self.degree)]
        if self.lengths != expected:
            raise ValueError(f"sequence parallel: the ranks hold {self.lengths} positions; a sequence of "
                             f"{total} is split as torch.tensor_split splits it: {expected}")
        start = sum(self.lengths[: self.rank])
        own, keys = torch.arange(start, start + t, device=device), torch.arange(total, device=device)
        if self.mode == "ulysses":
            return own, keys, keys
        return own, _arange(zigzag(total, self.degree)[self.rank], device), keys

    def padding(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, S): every rank's (B, T_rank) slice of the padding mask, gathered in rank order."""
        longest = max(self.lengths)
        padded = mask.new_zeros(mask.shape[0], longest)
        padded[:, : mask.shape[1]] = mask
        pieces = [torch.empty_like(padded) for _ in range(self.degree)]
        dist.all_gather(pieces, padded, group=self.group)
        return torch.cat([p[:, :n] for p, n in zip(pieces, self.lengths, strict=True)], 1)


def split(total: int, parts: int) -> list[range]:
    """The runs of positions torch.tensor_split(torch.arange(total), parts) gives: the first
    total % parts one longer."""
    size, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def contiguous(total: int, n: int) -> list[list[range]]:
    """Each rank's runs of positions as the user passes them: one contiguous slice."""
    return [[r] for r in split(total, n)]


def zigzag(total: int, n: int) -> list[list[range]]:
    """Each rank's runs of positions in the ring's balanced layout: of 2n chunks, r and 2n-1-r."""
    chunks = split(total, 2 * n)
    return [[chunks[r], chunks[2 * n - 1 - r]] for r in range(n)]


def schedule(runs: list[list[range]], rank: int) -> list[list[tuple[int, int]]]:
    """Per ring step, the (query run, key run) pairs `rank` attends to, its own runs against
    those of rank - step: every pair with a key at or before a query (the rest is masked)."""
    n = len(runs)
    return [[(i, j) for i, q in enumerate(runs[rank]) for j, k in enumerate(runs[(rank - step) % n])
             if len(q) and len(k) and k.start < q.stop] for step in range(n)]


def _arange(runs: list[range], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(r.start, r.stop, device=device) for r in runs])


def _local(runs: list[range], r: range) -> slice:
    """Where positions `r` (inside one of `runs`) sit in the concatenation of `runs`."""
    offset = 0
    for run in runs:
        if run.start <= r.start and r.stop <= run.stop:
            return slice(offset + r.start - run.start, offset + r.stop - run.start)
        offset += len(run)
    raise AssertionError(f"{r} is not inside {runs}")


def _overlaps(a: list[range], b: list[range]) -> list[range]:
    """The runs of positions in both `a` and `b`, ascending."""
    both = (range(max(x.start, y.start), min(x.stop, y.stop)) for x in a for y in b)
    return sorted((r for r in both if len(r)), key=lambda r: r.start)


def reshard(x: torch.Tensor, have: list[list[range]], want: list[list[range]],
            sp: SequenceParallel) -> torch.Tensor:
    """(B, C, T, D) over this rank's runs of `have` -> (B, C, T', D) over its runs of `want`, in
    one all-to-all: each rank sends every other what it holds of that rank's new runs."""
    b, c, _, d = x.shape
    mine, ours = have[sp.rank], want[sp.rank]
    outgoing = [_overlaps(mine, want[j]) for j in range(sp.degree)]
    incoming = [_overlaps(have[i], ours) for i in range(sp.degree)]
    flat = torch.cat([x[:, :, _local(mine, r)].reshape(-1) for runs in outgoing for r in runs])
    send = [b * c * sum(map(len, runs)) * d for runs in outgoing]
    recv = [b * c * sum(map(len, runs)) * d for runs in incoming]
    got = _AllToAll.apply(flat, send, recv, sp.group)
    runs = [r for rs in incoming for r in rs]
    pieces = got.split([b * c * len(r) * d for r in runs])
    ordered = sorted(zip(runs, pieces, strict=True), key=lambda rp: rp[0].start)  # ascending positions
    return torch.cat([p.view(b, c, len(r), d) for r, p in ordered], 2)


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
        # one all-to-all for q, k and v: rank j gets heads chunk j of each (v apart when its head
        # dim is its own, as MLA's is)
        same = v.shape[3] == d
        packed = torch.cat([y.view(b, n, -1, t, d) for y in ((q, k, v) if same else (q, k))], 2)
        q, k, *rest = self._to_heads(packed).split([h // n, kv // n, kv // n][: 3 if same else 2], 1)
        v = rest[0] if same else self._to_heads(v.reshape(b, n, -1, t, v.shape[3]))  # (B, heads / n, S, D)
        if mask is not None and mask.shape[1] != 1:  # per-head (ALiBi): this rank's heads
            mask = mask[:, self.sp.rank * (h // n): (self.sp.rank + 1) * (h // n)]
        out, _ = attention.KERNELS[backend](q, k, v, mask, scale, softcap)  # (B, H / n, S, D)
        return self._to_sequence(out), None


class _BlockAttention(torch.autograd.Function):
    """(output, log-sum-exp) in fp32 of queries over one block of keys, scored as the eager
    kernel scores them (softcap, then the mask). Only q, k, v, the output and the log-sum-exp are
    kept for backward, which recomputes the weights (as flash attention does): a rank's saved
    activations grow with its queries, not with its queries x keys."""

    @staticmethod
    def _weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the scores, (B, H, T_q, T_k) fp32, and the softcapped raw scores before the mask)."""
        capped = attention.tanh_softcap(torch.matmul(q, k.transpose(2, 3)) * scale, softcap)
        return (capped if mask is None else capped + mask).float(), capped

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,  # noqa: ANN001, ANN205
                scale: float, softcap: float | None):
        groups = q.shape[1] // k.shape[1]
        kr, vr = attention.repeat_kv(k, groups), attention.repeat_kv(v, groups)
        scores, _ = _BlockAttention._weights(q, kr, mask, scale, softcap)
        lse = torch.logsumexp(scores, -1, keepdim=True)
        out = torch.matmul(torch.exp(scores - lse), vr.float())  # (B, H, T_q, D)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale, ctx.softcap, ctx.groups = scale, softcap, groups
        return out, lse

    @staticmethod
    def backward(ctx, d_out: torch.Tensor, d_lse: torch.Tensor):  # noqa: ANN001, ANN205
        q, k, v, mask, out, lse = ctx.saved_tensors
        groups, b, kv, t, d = ctx.groups, *k.shape
        kr, vr = attention.repeat_kv(k, groups), attention.repeat_kv(v, groups)
        scores, capped = _BlockAttention._weights(q, kr, mask, ctx.scale, ctx.softcap)
        w = torch.exp(scores - lse)
        # out = w @ v with w = exp(s - lse): ds = w * (d_out . v - d_out . out) + w * d_lse
        d_w = torch.matmul(d_out, vr.float().transpose(2, 3))
        d_s = w * (d_w - (d_out * out).sum(-1, keepdim=True) + d_lse)
        if ctx.softcap is not None:  # d(cap * tanh(x / cap)) = 1 - tanh(x / cap) ** 2
            d_s = d_s * (1 - (capped.float() / ctx.softcap) ** 2)
        d_s = (d_s * ctx.scale).to(q.dtype)
        d_q = torch.matmul(d_s, kr)
        d_k = torch.matmul(d_s.transpose(2, 3), q).view(b, kv, groups, t, d).sum(2)  # back to KV heads
        d_v = torch.matmul(w.to(v.dtype).transpose(2, 3), d_out.to(v.dtype))
        d_v = d_v.view(b, kv, groups, t, v.shape[3]).sum(2)  # v's head dim may differ (MLA)
        return d_q, d_k, d_v, None, None, None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block pair of the ring (a function of its own: tests count the work it is given)."""
    return _BlockAttention.apply(q, k, v, mask, scale, softcap)


class Ring(nn.Module):
    """Attention of this rank's zigzag queries over K/V blocks passed round the ring, merged by
    log-sum-exp, between two re-shards (contiguous -> zigzag -> contiguous)."""

    def __init__(self, sp: SequenceParallel) -> None:
        super().__init__()
        self.sp = sp

    def forward(self, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, scale: float,
                softcap: float | None) -> tuple[torch.Tensor, None]:
        sp = self.sp
        n, rank, total = sp.degree, sp.rank, sum(sp.lengths)
        have, runs = contiguous(total, n), zigzag(total, n)
        b, h, kv, dk, dv = q.shape[0], q.shape[1], k.shape[1], k.shape[3], v.shape[3]
        widths = [y.shape[1] * y.shape[3] for y in (q, k, v)]  # q/k and v head dims may differ (MLA)
        flat = torch.cat([y.transpose(1, 2).reshape(b, 1, y.shape[2], -1) for y in (q, k, v)], 3)
        q, k, v = reshard(flat, have, runs, sp).split(widths, 3)  # (B, 1, T_zig, heads * D)
        q, k, v = (y.reshape(b, y.shape[2], heads, -1).transpose(1, 2)
                   for y, heads in zip((q, k, v), (h, kv, kv), strict=True))
        block = torch.cat([k, v], 3)  # (B, KV, T_zig, D_k + D_v): one pass round the ring
        to, frm = sp.global_rank((rank + 1) % n), sp.global_rank((rank - 1) % n)
        mine = runs[rank]
        merged: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(mine)
        steps = schedule(runs, rank)
        for step, pairs in enumerate(steps):
            src = (rank - step) % n
            if step:
                shape = (*block.shape[:2], sum(map(len, runs[src])), block.shape[3])
                block = _RingPass.apply(block, shape, to, frm, sp.group)
            for i, j in pairs:
                qr, kr = mine[i], runs[src][j]
                rows, cols = _local(mine, qr), _local(runs[src], kr)
                if mask is not None:  # the trunk's mask: rows are the zigzag queries, columns every key
                    m = mask[..., rows, kr.start: kr.stop]
                elif kr.stop - 1 <= qr.start:  # plain causal, every key at or before every query
                    m = None
                else:
                    m = attention.additive(attention.allowed(torch.arange(qr.start, qr.stop, device=q.device),
                                                             torch.arange(kr.start, kr.stop, device=q.device),
                                                             None, None), q.dtype)
                kb, vb = block[:, :, cols, :dk], block[:, :, cols, dk:]
                out, lse = _attend(q[:, :, rows], kb, vb, m, scale, softcap)
                if merged[i] is not None:
                    out0, lse0 = merged[i]
                    both = torch.logaddexp(lse0, lse)
                    out, lse = out0 * torch.exp(lse0 - both) + out * torch.exp(lse - both), both
                merged[i] = out, lse
        outs = [q.new_zeros(b, h, len(r), dv) if acc is None else acc[0].to(q.dtype)
                for r, acc in zip(mine, merged, strict=True)]  # an empty run (a sequence under 2n) has none
        out = torch.cat(outs, 2)
        if n > 1 and not steps[-1]:  # the last block unused (empty chunks): keep its pass in the graph,
            out = out + 0 * block.sum()  # whose backward is a collective the sender waits for
        out = reshard(out.transpose(1, 2).reshape(b, 1, -1, h * dv), runs, have, sp)  # (B, 1, T, H * D_v)
        return out.view(b, -1, h, dv).transpose(1, 2), None


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
