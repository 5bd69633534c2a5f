"""Autograd-aware collectives built on torch.distributed, each timed under its kind.

The pairs follow Megatron-LM's f/g operators: `copy_to_group` is the identity forward and an
all-reduce backward (entering a tensor-parallel region); `reduce_from_group` is an all-reduce
forward and the identity backward (leaving it). `all_to_all` sends rows with given split sizes
and routes gradients back the same way.
"""
from __future__ import annotations

import queue
import threading
from datetime import timedelta
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from masep.parallel.grad_compression import grad_reducer
from masep.telemetry.timing import comm_timer

# ma.failover on gloo: says why to stop waiting (another rank began a regroup), or None. Without
# it a rank waiting on a survivor that went on to regroup would sit out its whole timeout.
_watch: Optional[Callable[[], Optional[str]]] = None


def set_wait_watch(fn: Optional[Callable[[], Optional[str]]]) -> None:
    global _watch
    _watch = fn


class _Waiter:
    """A thread that waits on works for a caller that keeps watching meanwhile (gloo's
    send/receive works only complete inside `wait()`, so they cannot be polled)."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False
        threading.Thread(target=self._run, name="masep-comm-waiter", daemon=True).start()

    def _run(self) -> None:
        while not self.abandoned:
            works, timeout_s, failed, done = self.jobs.get()
            try:
                for work in works:
                    work.wait(timedelta(seconds=timeout_s)) if timeout_s else work.wait()
            except RuntimeError as e:
                failed.append(e)
            done.set()


_waiter: Optional[_Waiter] = None


def wait_works(works: list, timeout_s: Optional[float]) -> None:
    """Wait for `works`, at most `timeout_s` (None: the group's timeout); a failed one raises
    its RuntimeError. Under a watch a helper thread waits while this one looks at the watch, and
    a reason from it ends the wait (the helper is left to its timeout)."""
    global _waiter
    if _watch is None:
        for work in works:
            work.wait(timedelta(seconds=timeout_s)) if timeout_s else work.wait()
        return
    if _waiter is None:
        _waiter = _Waiter()
    failed: list = []
    done = threading.Event()
    _waiter.jobs.put((works, timeout_s, failed, done))
    while not done.wait(0.02):
        why = _watch()
        if why:
            _waiter.abandoned, _waiter = True, None
            raise RuntimeError(why)
    if failed:
        raise failed[0]


def _all_reduce(x: torch.Tensor, group, kind: str) -> torch.Tensor:
    with comm_timer().time(kind):
        dist.all_reduce(x, group=group)
    return x


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, kind):
        ctx.group, ctx.kind = group, kind
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous().clone(), ctx.group, ctx.kind), None, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, kind):
        return _all_reduce(x.contiguous().clone(), group, kind)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def copy_to_group(x: torch.Tensor, group, kind: str = "attn_allreduce") -> torch.Tensor:
    return _CopyToGroup.apply(x, group, kind)


def reduce_from_group(x: torch.Tensor, group, kind: str = "attn_allreduce") -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group, kind)


class _GatherFromGroup(torch.autograd.Function):
    """Concatenate each rank's rows along dim 0; backward keeps this rank's rows (the consumers
    downstream are replicated across the group, so their gradients are already complete)."""

    @staticmethod
    def forward(ctx, x, group, kind, sizes):
        ctx.rank, ctx.sizes = dist.get_rank(group), sizes
        parts = [x.new_empty((n,) + x.shape[1:]) for n in sizes]
        with comm_timer().time(kind):
            dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]].contiguous(), None, None, None


def gather_rows(x: torch.Tensor, group, sizes: list[int], kind: str) -> torch.Tensor:
    return _GatherFromGroup.apply(x, group, kind, sizes)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, kind):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.kind = out_splits, in_splits, group, kind
        out = x.new_empty((sum(out_splits),) + x.shape[1:])
        with comm_timer().time(kind):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.in_splits),) + grad.shape[1:])
        with comm_timer().time(ctx.kind):
            dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None,
               kind: str = "moe_dispatch") -> torch.Tensor:
    """Rows x[sum(in_splits[:j]) : ...] go to rank j of `group`; returns the rows received."""
    return _AllToAll.apply(x, out_splits, in_splits, group, kind)


def exchange_counts(send_counts: torch.Tensor, group=None, kind: str = "moe_dispatch") -> torch.Tensor:
    """All-to-all of per-destination counts (one integer per rank of `group`)."""
    recv = torch.empty_like(send_counts)
    with comm_timer().time(kind):
        dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


def sync_gradients(params: Iterable[torch.nn.Parameter], group, kind: str = "grad_sync",
                   bucket_bytes: int = 64 << 20) -> None:
    """Sum gradients over `group` in flat buckets. A parameter that got no gradient on this
    rank (e.g. an expert no token chose) contributes zeros, so every rank joins each call."""
    if group is None or dist.get_world_size(group) == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
        if bucket and (p is None or size >= bucket_bytes):
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            if grad_reducer() is None:
                _all_reduce(flat, group, kind)
            else:  # train.grad_compression: int8; the bucket's parameters name its residuals
                grad_reducer().all_reduce(flat, group, (id(group), *map(id, bucket)), kind)
            offset = 0
            for q in bucket:
                n = q.grad.numel()
                q.grad.copy_(flat[offset:offset + n].view_as(q.grad))
                offset += n
            bucket, size = [], 0


def all_reduce_sum(t: torch.Tensor, group=None, kind: Optional[str] = None) -> torch.Tensor:
    """Plain in-place sum (for statistics); timed only when a kind is given."""
    if kind is None:
        dist.all_reduce(t, group=group)
        return t
    return _all_reduce(t, group, kind)


def new_group_containing(rank: int, groups: list[list[int]], timeout=None):
    """Create every group in `groups` (all ranks must call this with the same list, in the same
    order) and return the one holding `rank`, or None."""
    mine = None
    for ranks in groups:
        g = dist.new_group(ranks=ranks, timeout=timeout)
        if rank in ranks:
            mine = g
    return mine


class PeerCommError(RuntimeError):
    """A point-to-point exchange failed: a peer died, or did not answer within the timeout."""


def p2p_exchange(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
                 group=None, timeout_s: Optional[float] = None, kind: str = "p2p") -> None:
    """Post every send `(tensor, dst)` and receive `(buffer, src)` at once
    (`dist.batch_isend_irecv`), then wait for all of them; peers are global ranks.

    Posting both directions before waiting is what makes pipeline exchanges such as
    send-forward/receive-backward deadlock-free (Megatron-LM pairs them the same way). The
    time spent, transfer plus waiting for the peer to reach its side, is recorded under `kind`.
    A dead or silent peer raises `PeerCommError` naming it (after `timeout_s` at the latest).
    """
    post_p2p([(t.contiguous(), dst) for t, dst in sends], recvs, group, kind, 0,
             "point-to-point exchange", timeout_s).wait()


class _CopyManyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, kind, *xs):
        ctx.group, ctx.kind = group, kind
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        dtype = grads[0].dtype
        for g in grads[1:]:
            dtype = torch.promote_types(dtype, g.dtype)
        flat = _all_reduce(torch.cat([g.reshape(-1).to(dtype) for g in grads]), ctx.group, ctx.kind)
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset:offset + g.numel()].view_as(g).to(g.dtype))
            offset += g.numel()
        return (None, None, *out)


def copy_many_to_group(tensors: list[torch.Tensor], group, kind: str) -> tuple[torch.Tensor, ...]:
    """`copy_to_group` of several tensors with ONE all-reduce of all their gradients in the
    backward. Separate copies would be independent branches of the graph, whose backward
    order the autograd engine may not keep alike on every rank; one collective has no order."""
    return _CopyManyToGroup.apply(group, kind, *tensors)


# ---------------------------------------------------------------- non-blocking point-to-point
# (ma_sep: attention ranks and MoE ranks exchange routed rows while both keep computing)


class PendingP2P:
    """Transfers posted by `post_p2p`; `wait()` blocks until all are done. Until then the send
    tensors must not change and the receive buffers hold no data yet."""

    def __init__(self, works: list, what: str, peers: list[int], kind: str, timeout_s: Optional[float]):
        self.works, self.what, self.peers, self.kind, self.timeout_s = works, what, peers, kind, timeout_s

    def wait(self) -> None:
        if not self.works:
            return
        # Only the time spent blocked here is recorded: a transfer that completed behind
        # computation costs nothing, which is what the overlap is meant to achieve.
        with comm_timer().time(self.kind):
            try:
                wait_works(self.works, self.timeout_s)
            except RuntimeError as e:  # DistBackendError and gloo's IO errors derive from it
                raise PeerCommError(
                    f"rank {dist.get_rank()}: {self.what} with rank(s) {self.peers} failed (peer gone, "
                    f"or no answer within {self.timeout_s}s): {str(e).splitlines()[0]}") from e
        self.works = []


def post_p2p(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
             group=None, kind: str = "p2p", tag: int = 0, what: str = "point-to-point transfer",
             timeout_s: Optional[float] = None) -> PendingP2P:
    """Post sends `(tensor, dst)` and receives `(buffer, src)` (global ranks) as one
    `dist.batch_isend_irecv` and return at once; wait on the result only when the data is needed.

    Tensors without elements are skipped: both sides derive the sizes from the same counts, so
    both skip the same transfers. All tensors of one call must live on one device. Between two
    ranks, transfers in one direction within `group` match in the order they are posted.
    """
    ops = ([dist.P2POp(dist.isend, t, dst, group, tag) for t, dst in sends if t.numel()]
           + [dist.P2POp(dist.irecv, buf, src, group, tag) for buf, src in recvs if buf.numel()])
    peers = sorted({p for t, p in sends if t.numel()} | {p for b, p in recvs if b.numel()})
    if not ops:
        return PendingP2P([], what, peers, kind, timeout_s)
    for op in ops:
        if not op.tensor.is_contiguous():
            raise ValueError("post_p2p: tensors must be contiguous")
    with comm_timer().time(kind):
        works = dist.batch_isend_irecv(ops)
    return PendingP2P(works, what, peers, kind, timeout_s)


def _all_gather_uneven(x: torch.Tensor, group, sizes: list[int], kind: str) -> torch.Tensor:
    """Concatenate each rank's rows (`sizes[r]` rows from rank r). gloo's all_gather wants equal
    shapes, so every part travels padded to the largest."""
    longest = max(sizes)
    padded = x.new_zeros((longest,) + x.shape[1:])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    with comm_timer().time(kind):
        dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _ScatterRows(torch.autograd.Function):
    """Keep this rank's block of rows of a tensor that every rank of `group` holds alike; the
    backward all-gathers the blocks' gradients, so each rank again holds the complete gradient of
    the replicated tensor (Megatron-LM's scatter to the sequence-parallel region)."""

    @staticmethod
    def forward(ctx, x, group, kind, sizes):
        ctx.group, ctx.kind, ctx.sizes = group, kind, sizes
        start = sum(sizes[: dist.get_rank(group)])
        return x[start:start + sizes[dist.get_rank(group)]].clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_uneven(grad.contiguous(), ctx.group, ctx.sizes, ctx.kind), None, None, None


class _GatherRowsUneven(torch.autograd.Function):
    """The inverse of `_ScatterRows`: concatenate the blocks; backward keeps this rank's block
    (the consumers are replicated across the group, so its gradient is already complete)."""

    @staticmethod
    def forward(ctx, x, group, kind, sizes):
        ctx.sizes, ctx.rank = sizes, dist.get_rank(group)
        return _all_gather_uneven(x.contiguous(), group, sizes, kind)

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]].contiguous(), None, None, None


def scatter_rows(x: torch.Tensor, group, sizes: list[int], kind: str) -> torch.Tensor:
    """This rank's `sizes[rank]` rows of the replicated `x` (blocks in rank order; sizes may differ)."""
    return _ScatterRows.apply(x, group, kind, sizes)


def gather_uneven_rows(x: torch.Tensor, group, sizes: list[int], kind: str) -> torch.Tensor:
    """Like `gather_rows` but for blocks of different sizes, also over gloo."""
    return _GatherRowsUneven.apply(x, group, kind, sizes)
