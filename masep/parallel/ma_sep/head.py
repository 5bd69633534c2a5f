"""The output head split by vocabulary between the groups (`ma.head_split`; the cut is
`masep.parallel.balance.HeadSplit`'s): vocab-parallel cross-entropy over the wire.

Forward of segment L (the final norm stays on the attention side): head shard 0 of each replica
sends the normed rows xn [N, H] and the targets to every MoE rank holding head rows, computes its
own part meanwhile (`head_part` of rows [0, cut)) and receives each MoE rank's part [N, 2]
(log-sum-exp of its logits, target logit); the cross-entropy is `split_cross_entropy` of the
parts, the unsplit one. Backward: the parts' gradients go to the MoE ranks, which run their
part's backward (their rows' gradient) and return xn's gradient. A replica's other head shards
get the parts and xn's gradient by broadcast from head shard 0. Decoding keeps the head unsplit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from masep.parallel.balance import head_part, split_cross_entropy
from masep.parallel.comm import PendingP2P
from masep.telemetry.timing import comm_timer

KIND = "moe_dispatch"
TAG_HEAD = 4  # beside protocol.py's tags 1-3


@dataclass
class HeadFlight:
    """Segment L of one micro-batch on an attention rank, kept for its backward."""
    xn: torch.Tensor  # [N, H] the normed rows (graph back to the segment's leaves)
    local_in: torch.Tensor  # xn detached: the input of the local part
    local: torch.Tensor  # [N, 2] the local part (graph to local_in and the head weight)
    parts: torch.Tensor  # [P, N, 2] every part, a leaf of the loss


def _replicate(rank, t: torch.Tensor) -> torch.Tensor:
    """Head shard 0's `t` on every head shard of the replica (in place)."""
    if rank.tp > 1:
        with comm_timer().time(KIND):
            dist.broadcast(t, src=rank.replica * rank.tp, group=rank.replica_group)
    return t


def head_forward(rank, x_normed: torch.Tensor, targets: torch.Tensor, where: str) -> tuple[HeadFlight, torch.Tensor]:
    """The attention side: per-token cross-entropy [N] of the normed rows of one micro-batch."""
    split, grad = rank.head_split, torch.is_grad_enabled()
    xn, t = x_normed.reshape(-1, x_normed.shape[-1]), targets.reshape(-1)
    peers = split.moe_peers()
    stats = [torch.empty((t.shape[0], 2), device=xn.device) for _ in peers]
    pending = []
    if rank.head_shard == 0 and peers:
        rows = xn.detach().to(rank.wire_dtype).contiguous()
        pending = [rank.post([(rows, d) for d in peers] + [(t.contiguous(), d) for d in peers], [], True, TAG_HEAD,
                             f"sending head rows of {where}"),
                   rank.post([], list(zip(stats, peers)), False, TAG_HEAD, f"receiving head parts of {where}")]
    local_in = xn.detach().requires_grad_(grad)
    with split.timed(True):
        local = head_part(local_in, rank.model.head.weight, split.rows(), t)
    for p in pending:
        p.wait()
    remote = _replicate(rank, torch.stack(stats)) if peers else local.new_empty((0,) + local.shape)
    parts = torch.cat([local.detach()[None], remote]).requires_grad_(grad)
    return HeadFlight(xn, local_in, local, parts), split_cross_entropy(parts)


def head_backward(rank, f: HeadFlight, where: str) -> None:
    """The attention side, after the loss's backward reached `f.parts`: the parts' backward, local
    and remote at once, then xn's."""
    split = rank.head_split
    g = f.parts.grad if f.parts.grad is not None else torch.zeros_like(f.parts)
    peers = split.moe_peers()
    dx = [torch.empty(f.local_in.shape, dtype=rank.wire_dtype, device=g.device) for _ in peers]
    pending = []
    if rank.head_shard == 0 and peers:
        pending = [rank.post([(g[1 + k].contiguous(), d) for k, d in enumerate(peers)], [], True, TAG_HEAD,
                             f"sending head part gradients of {where}"),
                   rank.post([], list(zip(dx, peers)), False, TAG_HEAD, f"receiving head input gradients of {where}")]
    with split.timed(False):
        torch.autograd.backward(f.local, g[0])
    total = f.local_in.grad
    if peers:
        for p in pending:
            p.wait()
        total = total + _replicate(rank, torch.stack(dx).sum(0)).to(total.dtype)
    torch.autograd.backward(f.xn, total)


@dataclass
class ServedHead:
    """The head part of one micro-batch on a MoE rank, kept for its backward."""
    x: torch.Tensor  # received rows of all senders (a leaf while training)
    parts: torch.Tensor  # [senders * N, 2]
    sent: PendingP2P


def serve_head_forward(rank, weight: torch.Tensor, senders: list[int], n_tokens: int,
                       where: str) -> Optional[ServedHead]:
    """The MoE side: receive each sender's normed rows and targets, compute this rank's part of
    all of them at once and post each sender's part back."""
    split = rank.head_split
    if split.rows()[0] == split.rows()[1]:
        return None  # no rows here: the attention side sends nothing
    H = weight.shape[1]
    xs = [torch.empty((n_tokens, H), dtype=rank.wire_dtype, device=rank.device) for _ in senders]
    ts = [torch.empty(n_tokens, dtype=torch.long, device=rank.device) for _ in senders]
    rank.post([], list(zip(xs, senders)) + list(zip(ts, senders)), True, TAG_HEAD,
              f"receiving head rows of {where}").wait()
    x = torch.cat(xs).requires_grad_(torch.is_grad_enabled())
    with rank.autocast(), split.timed(True):
        parts = head_part(x, weight, split.rows(), torch.cat(ts))
    sent = rank.post(list(zip(parts.detach().split(n_tokens), senders)), [], False, TAG_HEAD,
                     f"sending head parts of {where}")
    return ServedHead(x, parts, sent)


def serve_head_backward(rank, served: Optional[ServedHead], senders: list[int], n_tokens: int,
                        where: str) -> Optional[PendingP2P]:
    if served is None:
        return None
    gs = [torch.empty((n_tokens, 2), device=rank.device) for _ in senders]
    rank.post([], list(zip(gs, senders)), True, TAG_HEAD, f"receiving head part gradients of {where}").wait()
    with rank.head_split.timed(False):
        torch.autograd.backward(served.parts, torch.cat(gs))
    served.sent.wait()
    return rank.post(list(zip(served.x.grad.split(n_tokens), senders)), [], False, TAG_HEAD,
                     f"sending head input gradients of {where}")
